"""Where a stage's language model comes from: the dense original (a `ModelSpec`) or a gated checkpoint
directory (the sparsify stage's `model/`), loaded the same way for every later stage."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from runtime.files import files_sha256
from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import GATE_FILE, GateError, load_gated_model
from sparse_attention.models import GEMMA3_NAME, SMOLLM2_NAME, load_model

ModelSource = ModelSpec | str | Path  # a spec (dense original) or a gated checkpoint directory (sparsify's model/)
HF_NAMES = {SMOLLM2_NAME: "HuggingFaceTB/SmolLM2-135M-Instruct", GEMMA3_NAME: "google/gemma-3-270m"}


def load_source(model: ModelSource) -> tuple[nn.Module, object, dict]:
    """(eval-mode LM with frozen weights, tokenizer, identity) for a ModelSpec or a gated checkpoint directory.

    The identity names the weights by content (`source_identity`), so a training checkpoint is never resumed
    against a different model, and a copied checkpoint directory is the same model.
    """
    if isinstance(model, ModelSpec):
        lm, tokenizer = load_model(model.name, tiny=model.tiny)
    else:
        lm, tokenizer = load_gated_model(Path(model))
    lm.requires_grad_(False)
    return lm.eval(), tokenizer, source_identity(model)


def source_identity(model: ModelSource) -> dict:
    """What names a model source, without loading it: a ModelSpec's fields, or for a gated checkpoint the
    sha256 of its files' contents (`gated_sha256`; never its path or file times)."""
    if isinstance(model, ModelSpec):
        return {"kind": "dense", **model.model_dump(mode="json"), "model_name": HF_NAMES.get(model.name, model.name)}
    directory = Path(model)
    if not (directory / GATE_FILE).is_file():
        raise GateError(f"{directory} has no {GATE_FILE}: not a gated checkpoint written by GatedModel.save")
    names = [p.relative_to(directory).as_posix() for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith(".")]  # hidden: temporaries of a killed write
    digest = files_sha256(directory, names)
    return {"kind": "gated", "model_name": f"gated-{digest[:16]}", "gated_sha256": digest}
