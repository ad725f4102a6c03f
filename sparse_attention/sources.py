"""Where a stage's language model comes from: the dense original (a `ModelSpec`) or a gated checkpoint
directory (the sparsify stage's `model/`), loaded the same way for every later stage."""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch import nn

from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import GATE_FILE, load_gated_model
from sparse_attention.models import GEMMA3_NAME, SMOLLM2_NAME, load_model

ModelSource = ModelSpec | str | Path  # a spec (dense original) or a gated checkpoint directory (sparsify's model/)
HF_NAMES = {SMOLLM2_NAME: "HuggingFaceTB/SmolLM2-135M-Instruct", GEMMA3_NAME: "google/gemma-3-270m"}


def load_source(model: ModelSource) -> tuple[nn.Module, object, dict]:
    """(eval-mode LM with frozen weights, tokenizer, identity) for a ModelSpec or a gated checkpoint directory.

    The identity names the weights (for a gated checkpoint: its path and a hash of its gate offsets),
    so a training checkpoint is never resumed against a different model.
    """
    if isinstance(model, ModelSpec):
        lm, tokenizer = load_model(model.name, tiny=model.tiny)
        identity = {"kind": "dense", **model.model_dump(mode="json")}
        identity["model_name"] = HF_NAMES.get(model.name, model.name)
    else:
        directory = Path(model).resolve()
        lm, tokenizer = load_gated_model(directory)
        files = sorted(directory.glob("*.safetensors"))
        identity = {"kind": "gated", "checkpoint": str(directory), "model_name": str(directory),
                    "gate_sha256": hashlib.sha256((directory / GATE_FILE).read_bytes()).hexdigest(),
                    "weights": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
    lm.requires_grad_(False)
    return lm.eval(), tokenizer, identity
