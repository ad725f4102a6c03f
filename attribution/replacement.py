"""The local replacement model of one prompt: what is frozen, what is a node, what is a constant.

One forward pass of the real model (dense, or gated sparse) records the attention patterns actually
applied to values (gates included), every RMSNorm scale (pre-attention, pre-MLP, final, the norms on
queries and keys, the norm on the attention output), and the MLP inputs and outputs. With those frozen
and the CLT in place of every MLP, the model is linear in the residual stream: MLP outputs are sums of
feature writes, error nodes (true output - reconstruction) and constants (decoder biases, and the whole
MLP output at the BOS position, which - as in circuit-tracer - is attributed to nothing); value-projection
biases make a constant attention write too. The family's part (which norms exist, Gemma's (1 + w) gains
and embedding scale) comes from sparse_attention/architectures.py; `extract_weights` refuses a family or
setting the replacement model cannot compute exactly (per-layer score scaling).

Soft-caps (Gemma-2): the attention soft-cap acts inside the frozen patterns, so the graph stays linear
and exact; QK attribution splits the pre-cap score, and the gate logit is cap * tanh(score / cap) + offset.
The final-logit soft-cap is left out of the logit nodes: their values and incoming edges are for the
pre-cap logit z (linear in the final residual); the model outputs cap * tanh(z / cap), monotone in z, and
the logit targets' probabilities come from those capped logits.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sparse_attention.architectures import Architecture, architecture, require
from sparse_attention.gated_attention import ATTENTION_NAME, GatedModel
from sparse_attention.hook_points import hf_model, hooks, layers, module


class AttributionError(ValueError):
    """An input to attribution (model, CLT, prompt, store) that cannot be used; the message says why."""


class PromptTooLongError(AttributionError):
    """The tokenised prompt (with its BOS) does not fit the model's context."""


@dataclass(frozen=True)
class ModelWeights:
    """The weights of a model that the linear replacement model needs, in float32. Norm gains are what
    the norm multiplies by (Gemma: 1 + w); a family without a norm there has gain 1 (and frozen scale 1)."""

    embed: torch.Tensor  # [vocab, d] what the embedding writes per token (Gemma: times sqrt(d))
    unembed: torch.Tensor  # [vocab, d]
    attn_norm: torch.Tensor  # [L, d] gain of the pre-attention norm (LayerNorm: ones, folded into W_Q/K/V)
    mlp_norm: torch.Tensor  # [L, d] gain of the pre-MLP norm
    final_norm: torch.Tensor  # [d]
    W_Q: torch.Tensor  # [L, H * dh, d] (q_proj.weight)
    W_K: torch.Tensor  # [L, K * dh, d] (k_proj.weight)
    W_V: torch.Tensor  # [L, K * dh, d] (v_proj.weight)
    W_O: torch.Tensor  # [L, d, H * dh] (o_proj.weight, rows times the gain of a norm on the attention output)
    b_Q: torch.Tensor | None  # [L, H * dh] projection biases (Qwen2), None without
    b_K: torch.Tensor | None  # [L, K * dh]
    b_V: torch.Tensor | None  # [L, K * dh]
    q_norm: torch.Tensor | None  # [L, H * dh] gain of the norm on queries (a per-head gain repeated per head)
    k_norm: torch.Tensor | None  # [L, K * dh]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    attn_scale: float  # the attention's score scaling (1/sqrt(head_dim); Gemma: query_pre_attn_scalar^-1/2)
    n_ctx: int
    gate_offsets: torch.Tensor | None  # [L, H] gate offsets b, None for a dense model
    b_O: torch.Tensor | None = None  # [L, d] output-projection bias (GPT-2): a constant attention write
    centred_norms: bool = False  # LayerNorm: the pre-MLP and final norms centre their input
    mlp_norm_bias: torch.Tensor | None = None  # [L, d] LayerNorm bias of the pre-MLP norm: a constant in mlp_in
    final_norm_bias: torch.Tensor | None = None  # [d]
    pos_embed: torch.Tensor | None = None  # [n_ctx, d] learned position embeddings (GPT-2): constants
    attn_softcap: float | None = None  # scores -> cap * tanh(score / cap) before softmax and gate (Gemma-2)
    final_softcap: float | None = None  # output logits -> cap * tanh(z / cap) (Gemma-2); logit nodes are z

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
    patterns: torch.Tensor  # [L, H, P, P] attention weights applied to values (gated, not renormalised), each
    # query's row times the frozen scale of the norm on the attention output where the family has one
    attn_inv_rms: torch.Tensor  # [L, P] 1 / rms of resid_pre (frozen pre-attention norm scale; LayerNorm: 1 / std)
    mlp_inv_rms: torch.Tensor  # [L, P] 1 / rms of resid_mid
    final_inv_rms: torch.Tensor  # [P]
    q_inv_rms: torch.Tensor | None  # [L, P, H] frozen scale of the norm on each head's query (None: no q norm)
    k_inv_rms: torch.Tensor | None  # [L, P, K]
    rope_cos: torch.Tensor  # [L, P, dh] (layers may differ: Gemma-3's local and global RoPE)
    rope_sin: torch.Tensor  # [L, P, dh]
    logits: torch.Tensor  # [vocab] pre-cap logits z at the last position (what logit nodes are)
    output_logits: torch.Tensor  # [vocab] the model's logits there: cap * tanh(z / cap) with a final soft-cap, else z


def gate_offsets_of(model: nn.Module) -> torch.Tensor | None:
    """[L, H] offsets of a gated model in eval mode; None when attention is dense."""
    if not isinstance(model, GatedModel) or model.mode == "dense":
        return None
    if model.mode != "eval":
        raise AttributionError(
            f"the gated model is in {model.mode!r} mode (random gates); call set_mode('eval') before attribution"
        )
    return model.offsets_per_head.detach().float().clone()


def norm_gain(arch: Architecture, norm: nn.Module) -> torch.Tensor:
    """What a norm multiplies the normalised input by: w, or Gemma's (1 + w).  -> [width]"""
    return norm.weight.detach().float() + arch.gain_offset


def norm_eps(norm: nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def centred(weight: torch.Tensor) -> torch.Tensor:
    """W C, with C = I - 11^T/d the centring of LayerNorm (symmetric): each row minus its mean.  [..., d]"""
    return weight - weight.mean(-1, keepdim=True)


def extract_weights(model: nn.Module) -> ModelWeights:
    """Read the weights of a HF causal LM (or GatedModel) of a family the replacement model supports into
    a ModelWeights; AttributionError (ArchitectureError for the family) for what it cannot compute exactly.
    LayerNorm (GPT-2): the pre-attention norm's gain, centring and bias are folded into W_Q/K/V and b_Q/K/V."""
    arch = require(model, "attribution")
    hf = hf_model(model)
    cfg = hf.config
    n_layers = len(layers(model))
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise AttributionError("scale_attn_by_inverse_layer_idx scales scores per layer, which the replacement "
                               "model does not do")

    def per_layer(name: str, read) -> torch.Tensor | None:
        """read(module blocks.{l}.`name`) for every layer, stacked; None where the family has no such module
        or read gives None.  -> [L, ...]"""
        if not arch.has(f"blocks.{{l}}.{name}"):
            return None
        values = [read(module(model, f"blocks.{layer}.{name}")) for layer in range(n_layers)]
        return None if values[0] is None else torch.stack([v.detach().float() for v in values])

    def gains(name: str, width: int) -> torch.Tensor:
        """Gains of norm blocks.{l}.`name` ([L, width]); ones where the family has none."""
        found = per_layer(name, lambda norm: norm_gain(arch, norm))
        return torch.ones(n_layers, width) if found is None else found

    def linear_weight(projection: nn.Module) -> torch.Tensor:
        """[out, in] whether nn.Linear or GPT-2's Conv1D (which stores [in, out])."""
        return projection.weight.T if isinstance(projection, Conv1D) else projection.weight

    n_heads = cfg.num_attention_heads
    n_kv_heads = getattr(cfg, "num_key_value_heads", None) or n_heads
    if arch.has("blocks.{l}.attn.qkv"):  # one fused projection: [q; k; v]
        W_Q, W_K, W_V = per_layer("attn.qkv", linear_weight).chunk(3, dim=1)
        b_Q, b_K, b_V = per_layer("attn.qkv", lambda qkv: qkv.bias).chunk(3, dim=1)
    else:
        W_Q, W_K, W_V = (per_layer(f"attn.{side}", linear_weight) for side in "qkv")
        b_Q, b_K, b_V = (per_layer(f"attn.{side}", lambda p: p.bias) for side in "qkv")
    attn_norm = gains("ln1", cfg.hidden_size)
    if arch.norm == "layer":  # fold LayerNorm: W (g * C x * s + beta) + b = (W g) C (x s) + (W beta + b)
        beta = per_layer("ln1", lambda norm: norm.bias)
        b_Q, b_K, b_V = (b + torch.einsum("led,ld->le", W, beta) for W, b in ((W_Q, b_Q), (W_K, b_K), (W_V, b_V)))
        W_Q, W_K, W_V = (centred(W * attn_norm[:, None]) for W in (W_Q, W_K, W_V))
        attn_norm = torch.ones_like(attn_norm)
    W_O = per_layer("attn.o", linear_weight)
    out_gain = per_layer("ln1_post", lambda norm: norm_gain(arch, norm))
    if out_gain is not None:
        W_O = W_O * out_gain[:, :, None]
    q_norm, k_norm = (per_layer(f"attn.{side}_norm", lambda norm: norm_gain(arch, norm)) for side in "qk")
    if arch.qk_norm == "head":  # one gain [dh] shared by the heads
        q_norm, k_norm = q_norm.repeat(1, n_heads), k_norm.repeat(1, n_kv_heads)
    embed = hf.get_input_embeddings()
    return ModelWeights(
        embed=embed.weight.detach().float() * float(getattr(embed, "embed_scale", 1.0)),
        unembed=hf.get_output_embeddings().weight.detach().float(),
        attn_norm=attn_norm,
        mlp_norm=gains("ln2", cfg.hidden_size),
        final_norm=norm_gain(arch, module(model, "ln_final")),
        W_Q=W_Q,
        W_K=W_K,
        W_V=W_V,
        W_O=W_O,
        b_Q=b_Q,
        b_K=b_K,
        b_V=b_V,
        q_norm=q_norm,
        k_norm=k_norm,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=module(model, "blocks.0.attn").head_dim,
        attn_scale=float(module(model, "blocks.0.attn").scaling),
        n_ctx=cfg.max_position_embeddings,
        gate_offsets=gate_offsets_of(model),
        b_O=per_layer("attn.o", lambda o: o.bias),
        centred_norms=arch.norm == "layer",
        mlp_norm_bias=per_layer("ln2", lambda norm: getattr(norm, "bias", None)),
        final_norm_bias=getattr(module(model, "ln_final"), "bias", None),
        pos_embed=module(model, "pos_embed").weight.detach().float() if arch.has("pos_embed") else None,
        attn_softcap=softcap(cfg, "attn_logit_softcapping"),
        final_softcap=softcap(cfg, "final_logit_softcapping"),
    )


def softcap(cfg, setting: str) -> float | None:
    """The config's soft-cap `setting` as a float, None where the family has none or it is off."""
    cap = getattr(cfg, setting, None)
    return None if cap is None else float(cap)


def capped(values: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(values / cap), as Gemma-2 soft-caps scores and logits; values unchanged without a cap."""
    return values if cap is None else torch.tanh(values / cap) * cap


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


def rope_per_layer(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (cos, sin) of every layer from the model's own rotary module, at `positions` [1, P]; a rotary
    module that takes the layer's type (Gemma-3: local and global) is asked per type.  -> ([L, P, dh], [L, P, dh])"""
    n_layers = len(layers(model))
    if not architecture(model).has("rotary"):  # learned positions (GPT-2): no rotation
        shape = (n_layers, positions.shape[1], module(model, "blocks.0.attn").head_dim)
        return torch.ones(shape), torch.zeros(shape)
    rotary = module(model, "rotary")
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    found: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
    cos, sin = [], []
    for layer in range(n_layers):
        kind = getattr(module(model, f"blocks.{layer}.attn"), "layer_type", None) if per_type else None
        if kind not in found:
            found[kind] = rotary(hidden, positions, kind) if per_type else rotary(hidden, positions)
        cos.append(found[kind][0][0].float())
        sin.append(found[kind][1][0].float())
    return torch.stack(cos), torch.stack(sin)


def pattern_recorder(model: nn.Module, n_pos: int):
    """Forward hooks that copy each layer's attention weights (the second output of its attention module, what
    eager and the gated attention apply to values) into one preallocated float32 [L, H, P, P] tensor as the
    layer runs, so the forward pass never holds every layer's weights beside the patterns (as
    output_attentions would).  -> (patterns, layers recorded: a set, handles to remove)"""
    n_layers, n_heads = len(layers(model)), hf_model(model).config.num_attention_heads
    patterns = torch.empty(n_layers, n_heads, n_pos, n_pos)
    recorded: set[int] = set()

    def keep(layer: int):
        def hook(attention, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise AttributionError("the model's attention returned no attention weights; load it with "
                                       "attn_implementation='eager'")
            patterns[layer].copy_(weights[0])
            recorded.add(layer)
        return hook

    handles = [module(model, f"blocks.{layer}.attn").register_forward_hook(keep(layer)) for layer in range(n_layers)]
    return patterns, recorded, handles


@torch.no_grad()
def freeze_prompt(model: nn.Module, tokens: list[int] | torch.Tensor) -> FrozenPrompt:
    """Run the real model once on `tokens` and record everything the replacement model freezes."""
    arch = require(model, "attribution")
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
    if arch.qk_norm != "none":  # the projections before their norms
        points |= {"q": "blocks.{l}.attn.hook_q", "k": "blocks.{l}.attn.hook_k"}
    if arch.has("blocks.{l}.ln1_post"):  # the attention output before its norm
        points["z"] = "blocks.{l}.attn.hook_z"
    seen: dict[str, list[torch.Tensor]] = {key: [] for key in [*points, "resid_final"]}  # each [P, ...] per layer

    def keep(key: str):
        def fn(tensor: torch.Tensor) -> None:
            seen[key].append(tensor.detach()[0].float())
        return fn

    named = {point.format(l=layer): keep(key) for layer in range(n_layers) for key, point in points.items()}
    patterns, recorded, handles = pattern_recorder(model, len(tokens))
    try:
        with hooks(model, {**named, "hook_resid_final": keep("resid_final")}):
            out = model(input_ids=tokens[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if len(recorded) != n_layers:
        raise AttributionError("the model returned no attention patterns; load it with attn_implementation='eager'")

    def scale(inputs: torch.Tensor, norm: str) -> torch.Tensor:
        """Frozen scale of norm `norm` over its inputs [..., d]: 1/rms, or LayerNorm's 1/std.  -> [...]"""
        centre = arch.norm == "layer"
        return inv_rms(inputs - inputs.mean(-1, keepdim=True) if centre else inputs, norm_eps(module(model, norm)))

    def norm_scales(name: str, inputs: torch.Tensor) -> torch.Tensor:
        """Frozen scale of norm blocks.{l}.`name` over its inputs [L, P, d]; ones where there is no norm.  -> [L, P]"""
        if not arch.has(f"blocks.{{l}}.{name}"):
            return torch.ones(inputs.shape[:2])
        return scale(inputs, f"blocks.0.{name}")

    def head_scales(side: str, n_heads: int) -> torch.Tensor | None:
        """Frozen 1/rms of the norm on queries or keys, per head.  -> [L, P, heads]"""
        if arch.qk_norm == "none":
            return None
        projected, eps = torch.stack(seen[side]), norm_eps(module(model, f"blocks.0.attn.{side}_norm"))
        if arch.qk_norm == "head":
            return inv_rms(projected.unflatten(-1, (n_heads, -1)), eps)
        return inv_rms(projected, eps)[..., None].expand(-1, -1, n_heads).contiguous()

    cfg = hf.config
    output_logits = out.logits[0, -1].float().clone()  # not a view: the logits of every position are freed with `out`
    logits = output_logits  # pre-cap z: recomputed through the model's own final norm and unembedding where capped
    if softcap(cfg, "final_logit_softcapping") is not None:
        final_norm = module(model, "ln_final")
        final_hidden = final_norm(seen["resid_final"][0][-1:].to(final_norm.weight.dtype))
        logits = hf.get_output_embeddings()(final_hidden)[0].float()
    if "z" in points:  # rows of a query scaled by its frozen output-norm scale
        attn_out = torch.stack([module(model, f"blocks.{layer}.attn.o")(z) for layer, z in enumerate(seen["z"])])
        patterns.mul_(norm_scales("ln1_post", attn_out)[:, None, :, None])
    resid_pre, resid_mid, resid_final = torch.stack(seen["resid_pre"]), torch.stack(seen["resid_mid"]), seen["resid_final"][0]
    cos, sin = rope_per_layer(model, resid_pre[0][None], torch.arange(len(tokens))[None])
    return FrozenPrompt(
        tokens=tokens,
        resid_pre=resid_pre,
        resid_mid=resid_mid,
        resid_final=resid_final,
        mlp_in=torch.stack(seen["mlp_in"]),
        mlp_out=torch.stack(seen["mlp_out"]),
        patterns=patterns,
        attn_inv_rms=norm_scales("ln1", resid_pre),
        mlp_inv_rms=norm_scales("ln2", resid_mid),
        final_inv_rms=scale(resid_final, "ln_final"),
        q_inv_rms=head_scales("q", cfg.num_attention_heads),
        k_inv_rms=head_scales("k", getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads),
        rope_cos=cos,
        rope_sin=sin,
        logits=logits,
        output_logits=output_logits,
    )
