"""Gated sparse attention for any HF causal LM that dispatches through transformers' AttentionInterface.

`GatedModel` wraps a loaded model, owns the gate offsets b (one for the model, one per layer, or one per
layer and head: `OffsetScope`) and switches
the model's attention to the registered function "sparse_gated". It is called like the HF causal LM
it wraps (`model(input_ids=ids).logits`) and returns a `GatedCausalLMOutput`, whose `gate_record`
holds, per layer, the expected open fraction (for the loss), the open-edge counts, and optionally
the hard gate masks (for attribution). The active gate context (`_ACTIVE_GATE`) is how the forward
reaches the attention function; it is an implementation detail, not a hook point (those are in
sparse_attention/hook_points.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from sparse_attention.gate import (
    count_open_edges,
    expected_open_fraction,
    gate_logits,
    hard_gate,
    logistic_noise,
    masked_softmax,
    straight_through_gate,
)
from sparse_attention.models import load_model

ATTENTION_NAME = "sparse_gated"
GateMode = Literal["train", "eval", "dense"]
OffsetScope = Literal["model", "layer", "head"]
GATE_FILE = "gate.safetensors"
GATE_META_FILE = "gate.json"


class GateError(ValueError):
    """A gated checkpoint or gate setting that cannot be used."""


@dataclass
class GateRecord:
    """What one forward pass of a GatedModel observed, layer by layer."""

    expected_open: list[torch.Tensor] = field(default_factory=list)  # per layer [head], differentiable
    # per layer [head]: the same with the offset held fixed (differentiable in the scores only); with record_fixed_offset
    expected_open_fixed_offset: list[torch.Tensor] = field(default_factory=list)
    open_edges: list[torch.Tensor] = field(default_factory=list)  # per layer [head], hard gates open
    allowed_pairs: list[torch.Tensor] = field(default_factory=list)  # per layer [head], causal unpadded pairs
    gate_masks: list[torch.Tensor] = field(default_factory=list)  # per layer bool [batch, head, q, k]

    def regulariser(self) -> torch.Tensor:
        """Expected open fraction, heads and layers weighted equally (arXiv 2512.05865 leaves the weighting open)."""
        return torch.stack(self.expected_open).mean()

    def over_cap(self, cap: float, fixed_offset: bool = False) -> torch.Tensor:
        """Mean over layers and heads of max(0, expected open fraction - cap): zero unless a head is above `cap`.
        `fixed_offset`: from `expected_open_fixed_offset` (its gradient moves the scores, not the offset)."""
        fractions = self.expected_open_fixed_offset if fixed_offset else self.expected_open
        return (torch.stack(fractions) - cap).clamp(min=0).mean()

    def edge_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(open gates [layer, head], causal pairs [layer, head])."""
        return torch.stack(self.open_edges), torch.stack(self.allowed_pairs)


@dataclass
class _GateContext:
    offsets: list[torch.Tensor]  # per layer [head]
    mode: GateMode
    noise: bool
    query_valid: torch.Tensor | None  # [batch, q] bool, False at padded queries
    record_masks: bool
    record: GateRecord
    frozen_masks: list[torch.Tensor] | None = None  # per layer bool [batch, head, q, k]: eval gates given, not computed
    generator: torch.Generator | None = None  # of the training noise; None: torch's global generator
    record_fixed_offset: bool = False  # train mode: also record expected_open_fixed_offset
    head_open: torch.Tensor | None = None  # bool [layer, head], False at closed heads; None: no head closed


_ACTIVE_GATE: contextvars.ContextVar[_GateContext | None] = contextvars.ContextVar("active_gate", default=None)


def _expand_kv_heads(states: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[b, kv_heads, k, d] -> [b, n_heads, k, d] for grouped-query attention."""
    groups = n_heads // states.shape[1]
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def _allowed_pairs(attention_mask: torch.Tensor | None, q_len: int, k_len: int, device,
                   sliding_window: int | None = None) -> torch.Tensor:
    """Bool [b|1, 1, q, k]: True where the query may attend the key (causal, not padding, and within the
    layer's sliding window if it has one: key > query - window, as HF's sliding masks)."""
    if attention_mask is None:
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None]
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask == 0  # additive float mask: 0 = attend, large negative = masked
    if sliding_window is not None:
        query = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        allowed = allowed & (torch.arange(k_len, device=device)[None] > query - sliding_window)
    return allowed


def _attention_scores(query: torch.Tensor, key: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """q.k * scaling, soft-capped (cap * tanh(s / cap)) where the family does so (Gemma-2).  -> [b, h, q, k]"""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    return scores if softcap is None else torch.tanh(scores / softcap) * softcap


def _softmax_with_sinks(scores: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax over allowed keys; with per-head sink logits [h] (gpt-oss), each sink takes its share of
    the denominator and attends nothing.  -> [b, h, q, k]"""
    if sinks is None:
        return masked_softmax(scores, allowed)
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    with_sink = masked_softmax(torch.cat([scores, sink], -1),
                               torch.cat([allowed.expand_as(scores), torch.ones_like(sink, dtype=torch.bool)], -1))
    return with_sink[..., :-1]


def gated_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # [b, h, q, d]
    key: torch.Tensor,  # [b, kv_h, k, d]
    value: torch.Tensor,  # [b, kv_h, k, d]
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AttentionInterface function: softmax over causal keys, times the gate, not renormalised. Honours
    what the family's attention passes: `softcap` (scores soft-capped before softmax and gate),
    `sliding_window`, and `s_aux` (per-head attention sinks)."""
    ctx = _ACTIVE_GATE.get()
    if ctx is None:
        raise GateError(
            f"attention '{ATTENTION_NAME}' was called outside GatedModel.forward; wrap the model in "
            "sparse_attention.gated_attention.GatedModel and call that"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise GateError(f"{type(module).__name__} has no layer_idx; cannot pick its gate offset")
    n_heads = query.shape[1]
    key = _expand_kv_heads(key, n_heads)
    value = _expand_kv_heads(value, n_heads)
    scores = _attention_scores(query, key, scaling, kwargs.get("softcap"))  # [b, h, q, k]
    allowed = _allowed_pairs(attention_mask, scores.shape[2], scores.shape[3], scores.device,
                             kwargs.get("sliding_window"))
    if ctx.query_valid is not None:
        allowed = allowed & ctx.query_valid[:, None, -scores.shape[2]:, None]
    probs = _softmax_with_sinks(scores, allowed, kwargs.get("s_aux"))  # [b, h, q, k]

    if ctx.mode == "dense":
        weights = probs
        gate = allowed.expand_as(scores).to(scores.dtype)
    else:
        logits = gate_logits(scores, ctx.offsets[layer].to(scores.dtype))
        head_open = None if ctx.head_open is None else ctx.head_open[layer].view(1, -1, 1, 1)  # [1, h, 1, 1]
        if ctx.mode == "train":
            noise = logistic_noise(logits.shape, like=logits, generator=ctx.generator) if ctx.noise \
                else torch.zeros_like(logits)
            gate = straight_through_gate(logits, noise)
            gateable = allowed if head_open is None else allowed & head_open  # a closed head adds 0 to the regulariser
            ctx.record.expected_open.append(expected_open_fraction(logits, gateable))
            if ctx.record_fixed_offset:
                fixed = gate_logits(scores, ctx.offsets[layer].detach().to(scores.dtype))
                ctx.record.expected_open_fixed_offset.append(expected_open_fraction(fixed, gateable))
        elif ctx.frozen_masks is not None:
            gate = ctx.frozen_masks[layer].to(scores.dtype)
        else:
            gate = hard_gate(logits)
        if head_open is not None:
            gate = gate * head_open
        weights = probs * gate
    open_edges, pairs = count_open_edges(gate.detach() * allowed, allowed)
    ctx.record.open_edges.append(open_edges)
    ctx.record.allowed_pairs.append(pairs)
    if ctx.record_masks:
        ctx.record.gate_masks.append((gate.detach() > 0) & allowed)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [b, q, h, d]
    return output, weights


def register_gated_attention() -> None:
    """Register the attention function and its boolean mask under ATTENTION_NAME (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, gated_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, functools.partial(sdpa_mask, allow_is_causal_skip=False))


@dataclass
class GatedCausalLMOutput(CausalLMOutputWithPast):
    """The HF causal-LM output (logits [batch, pos, vocab]; attentions, when asked for, per layer
    [batch, head, q, k] gated weights) plus what the gates did in this forward."""

    gate_record: GateRecord | None = None


def offset_shape(scope: OffsetScope, n_layers: int, n_heads: int) -> tuple[int, int]:
    """Shape of the learned offsets for a scope; it broadcasts to [layer, head]."""
    shapes = {"model": (1, 1), "layer": (n_layers, 1), "head": (n_layers, n_heads)}
    if scope not in shapes:
        raise GateError(f"offset scope must be 'model', 'layer' or 'head', not {scope!r}")
    return shapes[scope]


class GatedModel(nn.Module):
    """A causal LM whose attention heads are gated; owns the offsets b.

    `offsets` is the learned parameter: [1, 1] for offset_scope 'model' (the paper's single scalar),
    [layer, 1] for 'layer', [layer, head] for 'head'; `offsets_per_head` broadcasts it to [layer, head].
    """

    def __init__(self, model: PreTrainedModel, offset_init: float, *, learn_offset: bool = True,
                 offset_scope: OffsetScope = "head", closed_heads: Sequence[tuple[int, int]] = ()):
        super().__init__()
        register_gated_attention()
        self.model = model
        self.model.set_attn_implementation(ATTENTION_NAME)
        cfg = model.config
        self.n_layers, self.n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        self.offset_scope = offset_scope
        offsets = torch.full(offset_shape(offset_scope, self.n_layers, self.n_heads), float(offset_init))
        self.offsets = nn.Parameter(offsets, requires_grad=learn_offset)  # broadcasts to [layer, head]
        self.closed_heads = sorted({(int(layer), int(head)) for layer, head in closed_heads})
        head_open = torch.ones(self.n_layers, self.n_heads, dtype=torch.bool)
        for layer, head in self.closed_heads:
            if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
                raise GateError(f"closed head L{layer}H{head} is not in the model ({self.n_layers} layers, "
                                f"{self.n_heads} heads)")
            head_open[layer, head] = False
        self.register_buffer("head_open", head_open, persistent=False)  # [layer, head]; moves with .to()
        self.mode: GateMode = "eval"
        self.noise = True
        self.frozen_masks: list[torch.Tensor] | None = None  # see frozen_gates
        self.noise_generator: torch.Generator | None = None

    @contextlib.contextmanager
    def frozen_gates(self, masks: list[torch.Tensor]) -> Iterator[None]:
        """Inside the block, eval mode uses these hard gates (per layer bool [batch, head, q, k], e.g. one
        run's `gate_record.gate_masks`) instead of computing them: the sparse model as a fixed structure."""
        if self.mode != "eval":
            raise GateError(f"frozen gates replace the hard gates of 'eval' mode; the model is in {self.mode!r}")
        if len(masks) != self.n_layers:
            raise GateError(f"frozen gates need one mask per layer ({self.n_layers}), got {len(masks)}")
        self.frozen_masks = list(masks)
        try:
            yield
        finally:
            self.frozen_masks = None

    @property
    def offsets_per_head(self) -> torch.Tensor:
        """The offsets broadcast to [layer, head] (differentiable; a view for scopes 'model' and 'layer')."""
        return self.offsets.expand(self.n_layers, self.n_heads)

    def set_mode(self, mode: GateMode, *, noise: bool = True, generator: torch.Generator | None = None
                 ) -> GatedModel:
        """'train': sampled gates + straight-through; 'eval': hard gates; 'dense': no gates at all.
        `generator` (on the model's device) draws the training noise from now on; not given, the one set
        before stays (`noise_generator`; None, the initial value: torch's global generator)."""
        if mode not in ("train", "eval", "dense"):
            raise GateError(f"gate mode must be 'train', 'eval' or 'dense', not {mode!r}")
        self.mode, self.noise = mode, noise
        if generator is not None:
            self.noise_generator = generator
        return self

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, pos]
        attention_mask: torch.Tensor | None = None,  # [batch, pos] 1 = token, 0 = padding
        *,
        record_masks: bool = False,
        record_fixed_offset: bool = False,
        output_attentions: bool = False,
        use_cache: bool = False,
        **kwargs,
    ) -> GatedCausalLMOutput:
        """The wrapped model's forward with gated attention; other keyword arguments go to the HF model.
        `record_masks` keeps the hard gate masks in `gate_record.gate_masks`; `record_fixed_offset` (train mode)
        also records each head's expected open fraction with the offset held fixed (`over_cap(fixed_offset=True)`)."""
        if use_cache:
            raise GateError("GatedModel keeps no key/value cache; call it with use_cache=False")
        query_valid = None if attention_mask is None else attention_mask.bool()
        offsets = list(self.offsets_per_head.unbind(0))
        ctx = _GateContext(offsets, self.mode, self.noise, query_valid, record_masks, GateRecord(),
                           self.frozen_masks, self.noise_generator, record_fixed_offset,
                           self.head_open if self.closed_heads else None)
        token = _ACTIVE_GATE.set(ctx)
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             output_attentions=output_attentions, **kwargs)
        finally:
            _ACTIVE_GATE.reset(token)
        return GatedCausalLMOutput(loss=out.loss, logits=out.logits, hidden_states=out.hidden_states,
                                   attentions=out.attentions if output_attentions else None, gate_record=ctx.record)

    def save(self, directory: str | Path, tokenizer=None, metadata: dict | None = None) -> None:
        """Write the HF model (safetensors), the tokenizer, the offsets and gate metadata into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        save_file({"offsets": self.offsets_per_head.detach().float().contiguous()}, str(directory / GATE_FILE))
        meta = {"attention": ATTENTION_NAME, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "offset_scope": self.offset_scope, "closed_heads": [list(h) for h in self.closed_heads],
                **(metadata or {})}
        (directory / GATE_META_FILE).write_text(json.dumps(meta, indent=2))


def gate_mode(model: nn.Module) -> GateMode | None:
    """The gate mode of a GatedModel ('train', 'eval' or 'dense'); None for a model without gates."""
    return model.mode if isinstance(model, GatedModel) else None


def load_gated_model(directory: str | Path, dtype: torch.dtype = torch.float32):
    """Load a checkpoint written by GatedModel.save: returns (GatedModel in eval mode, tokenizer).

    The file holds offsets per head [layer, head]; gate.json's offset_scope (default 'head') sets the
    learned shape, and offsets that vary within one scope group are refused; its closed_heads (default none)
    stay shut."""
    directory = Path(directory)
    gate_path = directory / GATE_FILE
    if not directory.is_dir():
        raise GateError(f"gated checkpoint {directory} does not exist; run the sparsify stage first")
    if not gate_path.is_file():
        raise GateError(f"{directory} has no {GATE_FILE}: not a gated checkpoint written by GatedModel.save")
    try:
        offsets = load_file(str(gate_path))["offsets"]
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise GateError(f"{gate_path} is unreadable ({exc}); the checkpoint is corrupted, rerun the stage") from exc
    meta_path = directory / GATE_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    scope = meta.get("offset_scope", "head")
    closed = meta.get("closed_heads", [])
    if not (isinstance(closed, list) and all(isinstance(h, list) and len(h) == 2 and
                                             all(isinstance(i, int) and not isinstance(i, bool) for i in h)
                                             for h in closed)):
        raise GateError(f"{meta_path} holds closed_heads {closed!r}: not a list of [layer, head] integer pairs")
    model, tokenizer = load_model(str(directory), dtype=dtype)
    gated = GatedModel(model, offset_init=0.0, offset_scope=scope, closed_heads=[tuple(h) for h in closed])
    if offsets.shape != (gated.n_layers, gated.n_heads):
        raise GateError(f"{gate_path} holds offsets {tuple(offsets.shape)}, "
                        f"model needs {(gated.n_layers, gated.n_heads)}")
    scoped = offsets[: gated.offsets.shape[0], : gated.offsets.shape[1]]
    if not torch.equal(scoped.expand_as(offsets), offsets):
        raise GateError(f"{gate_path} holds offsets that differ within one {scope!r} scope group; "
                        f"{meta_path.name} says offset_scope {scope!r}")
    with torch.no_grad():
        gated.offsets.copy_(scoped)
    return gated.eval().set_mode("eval"), tokenizer
