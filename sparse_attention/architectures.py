"""Every model family the stages know, in one table: where its modules are, how its norms, positions and
attention compute, which stages are exact on it, and why the others refuse it.

A family is a transformers `config.model_type`. `architecture(model)` finds a model's entry (one
`ArchitectureError` naming the family for anything else), and `require(model, stage)` is what each
stage's entry point calls before it does any work: it refuses a stage the family cannot do exactly.

Module names (ours -> HF attribute path; {l} is the layer; absent names: the family has no such module):

| name                     | what it is                                                             |
|--------------------------|------------------------------------------------------------------------|
| `embed`, `pos_embed`     | token embedding (Gemma's scales by sqrt(d_model) inside), learned positions (GPT-2) |
| `blocks`, `blocks.{l}`   | the decoder layers, one layer                                          |
| `blocks.{l}.ln1`         | the norm before attention (OLMo-2 has none: attention reads resid_pre)  |
| `blocks.{l}.attn`        | the attention module (has `layer_idx`, dispatches through AttentionInterface) |
| `blocks.{l}.attn.q/k/v/o`| projections (GPT-2: fused `attn.qkv`, and `attn.o`)                     |
| `blocks.{l}.attn.q_norm/k_norm` | norms on queries / keys before RoPE (Qwen3, Gemma-3: per head; OLMo-2: whole projection) |
| `blocks.{l}.ln1_post`    | the norm on the attention output before the residual add (OLMo-2, Gemma) |
| `blocks.{l}.ln2`         | the norm before the MLP (OLMo-2 has none)                               |
| `blocks.{l}.mlp`         | the MLP                                                                |
| `blocks.{l}.ln2_post`    | the norm on the MLP output before the residual add (OLMo-2, Gemma)      |
| `ln_final`, `unembed`    | the final norm, the unembedding                                        |
| `rotary`                 | (hidden, position ids) -> RoPE (cos, sin), HF's own (any rope_type); GPT-2 has none |

What the replacement model (attribution/) freezes, per prompt: the attention weights applied to values
(gates included; times the post-attention norm's scale at the query where there is one), the scale of
every norm (1/rms of its input, or LayerNorm's 1/std: pre-attention, pre-MLP, final, and q/k norms per
position and head), and the MLP outputs (replaced by the CLT). Gains, LayerNorm's centring, RoPE are
exact linear maps; biases (projections, LayerNorm's) and learned position embeddings are constants.
Gemma-2's soft-caps keep it exact: the attention soft-cap acts inside the frozen patterns (QK attribution
splits the pre-cap score; gate logit = cap * tanh(score / cap) + offset), and logit nodes are the pre-cap
logits z (the model outputs cap * tanh(z / cap), monotone in z; logit probabilities come from that output).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

STAGES = ("sparsify", "harvest", "attribution", "circuits")
Stage = Literal["sparsify", "harvest", "attribution", "circuits"]


class ArchitectureError(ValueError):
    """A model family outside the table, or a stage its family cannot compute exactly."""


@dataclass(frozen=True)
class Architecture:
    """One model family: module paths, how its parts compute, and the stages it refuses (and why)."""

    family: str
    modules: Mapping[str, str]
    norm: Literal["rms", "layer"] = "rms"  # RMSNorm, or LayerNorm (centres, and adds a bias)
    gain_offset: float = 0.0  # a norm multiplies by (gain_offset + weight): Gemma's (1 + w)
    qk_norm: Literal["none", "head", "whole"] = "none"  # q/k norms per head, or over the whole projection
    trainable: Mapping[str, str] = field(default_factory=lambda: {"attention": r"self_attn\.",
                                                                  "qk": r"self_attn\.(q_proj|k_proj)\."})
    refused: Mapping[str, str] = field(default_factory=dict)  # stage -> why it is not exact on this family

    def has(self, name: str) -> bool:
        """Whether the family has the module called `name` (a template like 'blocks.{l}.ln1')."""
        return name in self.modules


def _llama_style(**extra: str) -> dict[str, str]:
    """Module paths of the Llama layout (model.layers[l].self_attn.q_proj, ...), plus `extra`."""
    return {
        "embed": "model.embed_tokens",
        "blocks": "model.layers",
        "blocks.{l}": "model.layers.{l}",
        "blocks.{l}.ln1": "model.layers.{l}.input_layernorm",
        "blocks.{l}.attn": "model.layers.{l}.self_attn",
        "blocks.{l}.attn.q": "model.layers.{l}.self_attn.q_proj",
        "blocks.{l}.attn.k": "model.layers.{l}.self_attn.k_proj",
        "blocks.{l}.attn.v": "model.layers.{l}.self_attn.v_proj",
        "blocks.{l}.attn.o": "model.layers.{l}.self_attn.o_proj",
        "blocks.{l}.ln2": "model.layers.{l}.post_attention_layernorm",
        "blocks.{l}.mlp": "model.layers.{l}.mlp",
        "ln_final": "model.norm",
        "unembed": "lm_head",
        "rotary": "model.rotary_emb",
        **extra,
    }


_QK_NORMS = {"blocks.{l}.attn.q_norm": "model.layers.{l}.self_attn.q_norm",
             "blocks.{l}.attn.k_norm": "model.layers.{l}.self_attn.k_norm"}
_POST_NORMS = {"blocks.{l}.ln1_post": "model.layers.{l}.post_attention_layernorm",
               "blocks.{l}.ln2_post": "model.layers.{l}.post_feedforward_layernorm"}
_OLMO2 = {name: path for name, path in _llama_style(**_QK_NORMS, **_POST_NORMS).items()
          if name not in ("blocks.{l}.ln1", "blocks.{l}.ln2")}
_GEMMA = _llama_style(**_POST_NORMS, **{"blocks.{l}.ln2": "model.layers.{l}.pre_feedforward_layernorm"})
_NO_CIRCUITS_WHOLE_QK_NORM = ("its q/k norms normalise the whole projection (every head together), so patching one "
                              "head's input would change every head's query and key: no edge reaches one head alone")
_GPT2 = {
    "embed": "transformer.wte",
    "pos_embed": "transformer.wpe",
    "blocks": "transformer.h",
    "blocks.{l}": "transformer.h.{l}",
    "blocks.{l}.ln1": "transformer.h.{l}.ln_1",
    "blocks.{l}.attn": "transformer.h.{l}.attn",
    "blocks.{l}.attn.qkv": "transformer.h.{l}.attn.c_attn",
    "blocks.{l}.attn.o": "transformer.h.{l}.attn.c_proj",
    "blocks.{l}.ln2": "transformer.h.{l}.ln_2",
    "blocks.{l}.mlp": "transformer.h.{l}.mlp",
    "ln_final": "transformer.ln_f",
    "unembed": "lm_head",
}

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", _llama_style()),
    "qwen2": Architecture("qwen2", _llama_style()),
    "qwen3": Architecture("qwen3", _llama_style(**_QK_NORMS), qk_norm="head"),
    "olmo2": Architecture("olmo2", _OLMO2, qk_norm="whole", refused={"circuits": _NO_CIRCUITS_WHOLE_QK_NORM}),
    "gemma2": Architecture("gemma2", _GEMMA, gain_offset=1.0),
    "gemma3_text": Architecture("gemma3_text", {**_GEMMA, **_QK_NORMS}, gain_offset=1.0, qk_norm="head"),
    "gpt2": Architecture("gpt2", _GPT2, norm="layer", trainable={"attention": r"\.attn\."}, refused={
        "circuits": "the fused q/k/v projection (c_attn) cannot give each head its own input"}),
}


def family(model: nn.Module) -> str | None:
    """The `config.model_type` of the HF model inside `model` (a GatedModel or the HF model itself)."""
    hf = model if hasattr(model, "config") else getattr(model, "model", None)
    return getattr(getattr(hf, "config", None), "model_type", None)


def architecture(model: nn.Module) -> Architecture:
    """The table entry of `model`'s family; ArchitectureError naming the family if it has none."""
    name = family(model)
    if name not in ARCHITECTURES:
        raise ArchitectureError(
            f"model family {name!r} ({type(model).__name__}) is not supported; supported families: "
            f"{sorted(ARCHITECTURES)} (sparse_attention/architectures.py ARCHITECTURES)"
        )
    return ARCHITECTURES[name]


def require(model: nn.Module, stage: Stage) -> Architecture:
    """The family's entry, after checking that `stage` is exact on it: one ArchitectureError otherwise."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    arch = architecture(model)
    if stage in arch.refused:
        raise ArchitectureError(f"model family {arch.family!r} cannot run the {stage} stage: {arch.refused[stage]}")
    return arch


def trainable_pattern(model: nn.Module, which: str) -> re.Pattern:
    """The parameter-name pattern of the weights that `train.trainable = which` trains in `model`'s family
    ('all' matches every weight)."""
    if which == "all":
        return re.compile("")
    arch = architecture(model)
    if which not in arch.trainable:
        raise ArchitectureError(
            f"train.trainable={which!r} cannot be trained on model family {arch.family!r}: its weights are "
            f"not separate; choose one of {['all', *arch.trainable]}"
        )
    return re.compile(arch.trainable[which])
