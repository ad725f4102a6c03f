"""The local replacement model of one prompt: what is frozen, what is a node, what is a constant.

One forward pass of the real model (dense, or gated sparse) records the attention patterns actually
applied to values (gates included), every RMSNorm scale, and the MLP inputs and outputs. With those
frozen and the CLT in place of every MLP, the model is linear in the residual stream: MLP outputs are
sums of feature writes, error nodes (true output - reconstruction) and constants (decoder biases, and
the whole MLP output at the BOS position, which - as in circuit-tracer - is attributed to nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparse_attention.gated_attention import ATTENTION_NAME, GatedModel
from sparse_attention.hook_points import hf_model, hooks, layers, module


class AttributionError(ValueError):
    """An input to attribution (model, CLT, prompt, store) that cannot be used; the message says why."""


class PromptTooLongError(AttributionError):
    """The tokenised prompt (with its BOS) does not fit the model's context."""


@dataclass(frozen=True)
class ModelWeights:
    """The weights of a Llama-style model that the linear replacement model needs, in float32."""

    embed: torch.Tensor  # [vocab, d]
    unembed: torch.Tensor  # [vocab, d]
    attn_norm: torch.Tensor  # [L, d] gain of input_layernorm
    mlp_norm: torch.Tensor  # [L, d] gain of post_attention_layernorm
    final_norm: torch.Tensor  # [d]
    W_Q: torch.Tensor  # [L, H * dh, d] (q_proj.weight)
    W_K: torch.Tensor  # [L, K * dh, d] (k_proj.weight)
    W_V: torch.Tensor  # [L, K * dh, d] (v_proj.weight)
    W_O: torch.Tensor  # [L, d, H * dh] (o_proj.weight)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_ctx: int
    gate_offsets: torch.Tensor | None  # [L, H] gate offsets b, None for a dense model

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def d_model(self) -> int:
        return self.embed.shape[1]


@dataclass(frozen=True)
class FrozenPrompt:
    """Everything one real forward pass fixes for the prompt (float32, batch dimension dropped)."""

    tokens: torch.Tensor  # [P] long, starting with a special (BOS) token
    resid_pre: torch.Tensor  # [L, P, d] input of each layer
    resid_mid: torch.Tensor  # [L, P, d] after attention, before the MLP
    resid_final: torch.Tensor  # [P, d] input of the final norm
    mlp_in: torch.Tensor  # [L, P, d] output of post_attention_layernorm (what the CLT reads)
    mlp_out: torch.Tensor  # [L, P, d] true MLP output
    patterns: torch.Tensor  # [L, H, P, P] attention weights applied to values (gated, not renormalised)
    attn_inv_rms: torch.Tensor  # [L, P] 1 / rms of resid_pre (frozen input_layernorm scale)
    mlp_inv_rms: torch.Tensor  # [L, P] 1 / rms of resid_mid
    final_inv_rms: torch.Tensor  # [P]
    rope_cos: torch.Tensor  # [P, dh]
    rope_sin: torch.Tensor  # [P, dh]
    logits: torch.Tensor  # [vocab] at the last position


def gate_offsets_of(model: nn.Module) -> torch.Tensor | None:
    """[L, H] offsets of a gated model in eval mode; None when attention is dense."""
    if not isinstance(model, GatedModel) or model.mode == "dense":
        return None
    if model.mode != "eval":
        raise AttributionError(
            f"the gated model is in {model.mode!r} mode (random gates); call set_mode('eval') before attribution"
        )
    return model.offsets_per_head.detach().float().clone()


def extract_weights(model: nn.Module) -> ModelWeights:
    """Read the weights of a Llama-style HF model (or GatedModel) into a ModelWeights."""
    hf = hf_model(model)
    cfg = hf.config
    n_layers = len(layers(model))
    if any(module(model, f"blocks.{layer}.attn.{name}").bias is not None for layer in range(n_layers)
           for name in "qkvo"):
        raise AttributionError("attention projections with biases are not supported; use a Llama-style model")
    if getattr(cfg, "rope_parameters", None) and cfg.rope_parameters.get("rope_type", "default") != "default":
        raise AttributionError(f"rope_type {cfg.rope_parameters['rope_type']!r} is not supported; only 'default'")

    def stack(name: str) -> torch.Tensor:
        """The weight of module blocks.{l}.`name`, every layer.  -> [L, ...]"""
        return torch.stack([module(model, f"blocks.{layer}.{name}").weight.detach().float()
                            for layer in range(n_layers)])

    return ModelWeights(
        embed=hf.get_input_embeddings().weight.detach().float(),
        unembed=hf.get_output_embeddings().weight.detach().float(),
        attn_norm=stack("ln1"),
        mlp_norm=stack("ln2"),
        final_norm=module(model, "ln_final").weight.detach().float(),
        W_Q=stack("attn.q"),
        W_K=stack("attn.k"),
        W_V=stack("attn.v"),
        W_O=stack("attn.o"),
        n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads,
        head_dim=module(model, "blocks.0.attn").head_dim,
        n_ctx=cfg.max_position_embeddings,
        gate_offsets=gate_offsets_of(model),
    )


def tokenize_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids as circuit-tracer makes them: no special tokens added by the tokenizer, then the first
    of bos / pad / eos prefixed unless the text already starts with a special token."""
    if not isinstance(prompt, str) or not prompt:
        raise AttributionError(f"prompt must be a non-empty string, got {prompt!r}")
    ids = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    if ids and ids[0] in tokenizer.all_special_ids:
        return ids
    prefix = next((t for t in (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
                   if t is not None), None)
    if prefix is None:
        raise AttributionError("the tokenizer has no bos, pad or eos token to prefix the prompt with")
    return [prefix, *ids]


def check_prompt_length(n_tokens: int, n_ctx: int) -> None:
    if n_tokens > n_ctx:
        raise PromptTooLongError(
            f"the prompt is {n_tokens} tokens long with its BOS, more than the model's context of {n_ctx}; "
            "shorten the prompt"
        )


def inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, as HF's RMSNorm computes it.  [..., d] -> [...]"""
    return torch.rsqrt(x.float().pow(2).mean(-1) + eps)


@torch.no_grad()
def freeze_prompt(model: nn.Module, tokens: list[int] | torch.Tensor) -> FrozenPrompt:
    """Run the real model once on `tokens` and record everything the replacement model freezes."""
    hf = hf_model(model)
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    check_prompt_length(len(tokens), hf.config.max_position_embeddings)
    implementation = hf.config._attn_implementation
    if implementation not in ("eager", ATTENTION_NAME):  # those two return the patterns they apply
        raise AttributionError(
            f"attention implementation {implementation!r} does not return attention patterns; "
            "load the model with attn_implementation='eager'"
        )
    gate_offsets_of(model)  # refuses a gated model in train mode
    n_layers = len(layers(model))
    points = {"resid_pre": "blocks.{l}.hook_resid_pre", "resid_mid": "blocks.{l}.hook_resid_mid",
              "mlp_in": "blocks.{l}.ln2.hook_normalized", "mlp_out": "blocks.{l}.hook_mlp_out"}
    seen: dict[str, list[torch.Tensor]] = {key: [] for key in [*points, "resid_final"]}  # each [P, d] per layer

    def keep(key: str):
        def fn(tensor: torch.Tensor) -> None:
            seen[key].append(tensor.detach()[0].float())
        return fn

    named = {point.format(l=layer): keep(key) for layer in range(n_layers) for key, point in points.items()}
    with hooks(model, {**named, "hook_resid_final": keep("resid_final")}):
        out = model(input_ids=tokens[None], output_attentions=True, use_cache=False)
    if out.attentions is None or len(out.attentions) != n_layers:
        raise AttributionError("the model returned no attention patterns; load it with attn_implementation='eager'")

    positions = torch.arange(len(tokens))[None]
    cos, sin = module(model, "rotary")(seen["resid_pre"][0][None], positions)
    resid_pre, resid_mid, resid_final = torch.stack(seen["resid_pre"]), torch.stack(seen["resid_mid"]), seen["resid_final"][0]
    return FrozenPrompt(
        tokens=tokens,
        resid_pre=resid_pre,
        resid_mid=resid_mid,
        resid_final=resid_final,
        mlp_in=torch.stack(seen["mlp_in"]),
        mlp_out=torch.stack(seen["mlp_out"]),
        patterns=torch.stack([a[0].float() for a in out.attentions]),
        attn_inv_rms=inv_rms(resid_pre, module(model, "blocks.0.ln1").variance_epsilon),
        mlp_inv_rms=inv_rms(resid_mid, module(model, "blocks.0.ln2").variance_epsilon),
        final_inv_rms=inv_rms(resid_final, module(model, "ln_final").variance_epsilon),
        rope_cos=cos[0].float(),
        rope_sin=sin[0].float(),
        logits=out.logits[0, -1].float(),
    )
