"""Component-level circuits: attention heads and MLPs as nodes, the residual paths between them as edges.

Nodes write into the residual stream: the token embedding, every head (its slice of o_proj), every
MLP. Edges run from a writer u to a later reader v: a head's input (split into its q, k and v inputs
by default, `split_qkv`), an MLP's input, or the logits (the final norm's input). A reader's input is
the sum of the writes before it, so an edge is one term of that sum.

Ranking is attribution patching (EAP, Syed et al. / Hanna et al.): score(u, v) = (corrupted - clean
write of u) . d metric / d (input of v), on the clean run, summed over positions, averaged over prompts;
a head's node score is the sum over its out-edges (= its write difference . d metric / d write).
Heads and edges are kept in order of |score|; edge counts include the embed -> x and x -> logits edges.

Edges are traced twice: between components (summed over positions), and resolved by token position
(`position_edges`): u -> v at position p is u's write at p read by v's input at p (the residual stream
is per position; only attention moves information across positions, inside a head). Positions count
from the prompt's last token, so prompts of different lengths share edges by their distance to the
answer. Sparse attention should show here: a head's k/v inputs matter only at the keys it keeps open.
Verification is activation patching in the usual "corrupted into clean" direction: run the clean
prompt; a removed edge u -> v feeds v u's write from the corrupted run instead of u's write in this
run; a removed head has its output replaced by its corrupted output. Explained effect =
(m(kept) - m(none kept)) / (m(all kept) - m(none kept)), m = mean logit difference over the prompts;
with no edge kept the logits read the corrupted residual, so m(none) is the corrupted run's metric.
For the heads curve MLPs are always kept and computed freshly; m(none) is "every head patched".

Gates (GatedModel in "eval" mode) are part of the model: patching recomputes every downstream gate
from the patched inputs. The hard gate 1[s + b > 0] has zero gradient, so plain EAP's linearisation
holds the gates at their clean-run values and cannot see a patch flip one. With `gate_gradient =
"straight_through"` the gradient pass uses training's straight-through estimator instead (same hard
gates forward, d gate / d logit = sigmoid'(logit)), so edges that move gate logits are ranked too;
activation patching, which verifies every ranking, always uses the hard gates alone.

Each reader must get its own input, and grouped-query heads share k/v projections, so the model is
copied with k_proj / v_proj expanded to one KV head per query head (an exactly equivalent model).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from attribution.stats import bootstrap_ratio
from attribution.tasks import PromptBatch, TaskPrompt, encode_prompts, logit_diff, logits_fn
from sparse_attention.gated_attention import GatedModel


class CircuitError(ValueError):
    """A model, prompt set or setting that component circuits cannot use."""


class ComponentCircuitConfig(BaseModel):
    """How component circuits are ranked, verified and summarised; saved beside the results."""

    model_config = ConfigDict(extra="forbid")

    split_qkv: bool = Field(True, description="edges into a head end at its q, k or v input (else one input)")
    target: float = Field(0.9, gt=0, le=1, description="explained effect whose head / edge count is reported")
    batch_size: int = Field(16, gt=0, description="prompts per forward pass")
    curve_points: int = Field(20, ge=2, description="counts on each curve (geometric grid, plus 0 and all)")
    refine: bool = Field(True, description="bisect between grid points for the count reaching `target`")
    top_stored: int = Field(100, ge=0, description="top-ranked heads / edges stored by name with their scores")
    gate_gradient: Literal["none", "straight_through"] = Field(
        "straight_through", description="gates' gradient in EAP: none (hard gates, zero) or training's "
                                        "straight-through sigmoid (ignored for models without gates)")
    position_edges: bool = Field(True, description="also trace edges resolved by token position (counted from "
                                                   "the last token), a third curve")


CURVE_KINDS = ("heads", "edges", "position_edges")  # what a CircuitResult can hold curves of


# --------------------------------------------------------------------------------------------------
# Node and edge layout


@dataclass(frozen=True)
class ComponentLayout:
    """Row (writer) and column (reader) indices.

    Rows, in computation order: embed, then per layer its heads and its MLP: [U = 1 + L (H + 1)].
    Columns: per layer its head inputs (head-major, then q/k/v) and its MLP input, then the logits.
    """

    n_layers: int
    n_heads: int
    split_qkv: bool

    @property
    def n_inputs(self) -> int:
        return 3 if self.split_qkv else 1

    @property
    def n_rows(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_cols(self) -> int:
        return self.n_layers * (self.n_heads * self.n_inputs + 1) + 1

    def head_row(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_row(self, layer: int) -> int:
        return self.head_row(layer, self.n_heads)

    def head_cols(self, layer: int) -> slice:
        start = layer * (self.n_heads * self.n_inputs + 1)
        return slice(start, start + self.n_heads * self.n_inputs)

    def mlp_col(self, layer: int) -> int:
        return self.head_cols(layer).stop

    @property
    def logits_col(self) -> int:
        return self.n_cols - 1

    def rows_read(self) -> torch.Tensor:
        """[V] how many rows (a prefix) each column reads: heads read earlier layers, an MLP its own heads too."""
        reads = torch.full((self.n_cols,), self.n_rows)
        for layer in range(self.n_layers):
            reads[self.head_cols(layer)] = self.head_row(layer, 0)
            reads[self.mlp_col(layer)] = self.mlp_row(layer)
        return reads

    def allowed(self) -> torch.Tensor:
        """[U, V] bool: the edges that exist (writer before reader)."""
        return torch.arange(self.n_rows)[:, None] < self.rows_read()[None, :]

    def row_names(self) -> list[str]:
        names = ["embed"]
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.head.{h}" for h in range(self.n_heads)] + [f"blocks.{layer}.mlp"]
        return names

    def col_names(self) -> list[str]:
        kinds = ("q", "k", "v") if self.split_qkv else ("in",)
        names = []
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.head.{h}.{kind}" for h in range(self.n_heads) for kind in kinds]
            names.append(f"blocks.{layer}.mlp")
        return [*names, "logits"]


# --------------------------------------------------------------------------------------------------
# Pure tensor functions


def head_writes(z: torch.Tensor, o_weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Each head's write into the residual.  z [b, p, H * dh] (o_proj input), o_weight [d, H * dh] -> [b, p, H, d]."""
    b, p, _ = z.shape
    z = z.view(b, p, n_heads, -1)
    return torch.einsum("bphe,dhe->bphd", z, o_weight.view(o_weight.shape[0], n_heads, -1))


def per_head_projection(
    resid: torch.Tensor, delta: torch.Tensor, norm: nn.Module, weight: torch.Tensor
) -> torch.Tensor:
    """q/k/v projection where head h reads its own input: W_h norm(resid + delta_h).

    resid [b, p, d] (pre-norm residual), delta [b, p, H, d], weight [H * dh, d]  ->  [b, p, H * dh].
    """
    n_heads = delta.shape[2]
    normed = norm.forward(resid[:, :, None, :] + delta)  # [b, p, H, d]; .forward skips the norm's hooks
    out = torch.einsum("bphd,hed->bphe", normed, weight.view(n_heads, -1, weight.shape[-1]))
    return out.flatten(2)


def patch_heads(z: torch.Tensor, z_corrupted: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Heads not kept take their corrupted output.  z, z_corrupted [b, p, H * dh]; keep bool [H]."""
    head_dim = z.shape[-1] // keep.shape[0]
    return torch.where(keep.repeat_interleave(head_dim), z, z_corrupted)


def removed_input(prefix_diff: torch.Tensor, diffs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """What removed edges add to each reader's input: the sum over removed writers of (corrupted - actual).

    prefix_diff [b, p, d]: the sum over every writer the readers can read; diffs [U', b, p, d] those
    writers' differences; kept [U', C] or, per position, [U', C, p] bool, kept edges into the C readers
    ->  [b, p, C, d].
    """
    rows = kept.flatten(1).any(dim=1).nonzero().squeeze(1)
    if rows.numel() > diffs.shape[0] // 2:  # gathering most rows costs more than multiplying by zeros
        rows = slice(None)
    pattern = "kbpd,kcp->bpcd" if kept.dim() == 3 else "kbpd,kc->bpcd"
    kept_part = torch.einsum(pattern, diffs[rows], kept[rows].to(diffs.dtype))
    return prefix_diff[:, :, None, :] - kept_part


def explained_effect(metric: float, full: float, empty: float) -> float:
    """(metric - empty) / (full - empty): 1 = the whole model's effect, 0 = everything patched."""
    return (metric - empty) / (full - empty)


def count_grid(total: int, points: int) -> list[int]:
    """0, a geometric grid 1..total of about `points` counts, and total (sorted, unique)."""
    grid = {0, total}
    if total >= 1:
        grid |= {round(math.exp(i * math.log(total) / max(points - 1, 1))) for i in range(points)}
    return sorted(grid)


def count_to_reach(
    evaluate: Callable[[int], float], grid: Sequence[int], target: float, refine: bool = True
) -> tuple[int | None, dict[int, float]]:
    """Smallest count whose effect reaches `target`: the first grid count that does, then (with
    `refine`) bisection between it and the grid count before, assuming the curve is monotone there.
    Returns (count or None if no grid count reaches it, every evaluated {count: effect})."""
    effects = {count: evaluate(count) for count in grid}
    reached = [count for count in grid if effects[count] >= target]
    if not reached:
        return None, effects
    hi = reached[0]
    lower = [count for count in grid if count < hi]
    lo = lower[-1] if lower else hi
    while refine and hi - lo > 1:
        mid = (lo + hi) // 2
        effects[mid] = evaluate(mid)
        lo, hi = (lo, mid) if effects[mid] >= target else (mid, hi)
    return hi, dict(sorted(effects.items()))


def count_staying_above(effects: dict[int, float], target: float) -> int | None:
    """Smallest evaluated count from which every larger evaluated count reaches `target` (the curves are
    not monotone: keeping more components can lower the metric; this is the robust reading)."""
    count = None
    for k in sorted(effects, reverse=True):
        if effects[k] < target:
            break
        count = k
    return count


def top_k_mask(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k allowed entries with the largest |score| (ties: lower flat index first)."""
    flat = scores.abs().flatten().masked_fill(~allowed.flatten(), -1.0)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.shape, dtype=torch.bool)
    mask[order] = True
    return mask.view(scores.shape) & allowed  # k beyond the allowed count must not pick disallowed entries


# --------------------------------------------------------------------------------------------------
# The model copy and its hooks


def multi_head_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` (GatedModel or HF Llama) whose k_proj / v_proj have one KV head per query
    head (weights repeated per group), so every head can read its own input. Same function exactly."""
    copied = copy.deepcopy(model).requires_grad_(False)
    hf = copied.model if isinstance(copied, GatedModel) else copied
    cfg = hf.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for layer in hf.model.layers:
        attn = layer.self_attn
        if any(getattr(attn, name).bias is not None for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise CircuitError("attention projections with biases are not supported; use a Llama-style model")
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            weight = old.weight.view(n_kv, -1, old.in_features).repeat_interleave(n_heads // n_kv, dim=0)
            new = nn.Linear(old.in_features, weight.shape[0] * weight.shape[1], bias=False)
            new.weight = nn.Parameter(weight.flatten(0, 1).clone(), requires_grad=False)
            setattr(attn, name, new)
        attn.num_key_value_groups = 1
    cfg.num_key_value_heads = n_heads
    return copied


@dataclass
class Recording:
    """One run's writes: rows of the layout [U, b, p, d] and each layer's o_proj input [L, b, p, H * dh]."""

    writes: torch.Tensor
    z: torch.Tensor


@dataclass
class ComponentHooks:
    """Forward hooks on the HF modules for one forward pass: record writes, and optionally patch.

    Exactly one of: nothing (record), `keep_heads`/`keep_mlps` (node patching from `corrupted`),
    `keep_edges` (edge patching from `corrupted`), `track_grads` (zero input perturbations whose
    gradients are d metric / d reader input).
    """

    layout: ComponentLayout
    corrupted: Recording | None = None
    keep_heads: torch.Tensor | None = None  # [L, H] bool
    keep_mlps: torch.Tensor | None = None  # [L] bool
    keep_edges: torch.Tensor | None = None  # [U, V] bool, or [U, V, P] per position (the last p of P are a run's p)
    track_grads: bool = False
    writes: torch.Tensor | None = None  # [U, b, p, d], filled during the forward
    z: list[torch.Tensor] = field(default_factory=list)  # per layer [b, p, H * dh]
    perturbations: dict[int, torch.Tensor] = field(default_factory=dict)  # first column -> [b, p, C, d]
    _diffs: torch.Tensor | None = None  # [U, b, p, d] corrupted - actual (edge patching)
    _prefix_diff: torch.Tensor | None = None  # [b, p, d] sum of _diffs over rows written so far
    _resid: torch.Tensor | None = None  # [b, p, d] current layer's pre-norm input
    _head_delta: torch.Tensor | None = None  # [b, p, H, n_inputs, d]

    def __post_init__(self):
        patches = (self.keep_heads is not None or self.keep_mlps is not None) + (self.keep_edges is not None)
        if patches + self.track_grads > 1:
            raise CircuitError("ComponentHooks does one of node patching, edge patching or gradient tracking")
        if patches and self.corrupted is None:
            raise CircuitError("patching needs the corrupted run's Recording")

    @contextlib.contextmanager
    def attached(self, hf: nn.Module) -> Iterator[ComponentHooks]:
        """Register the hooks on `hf` (a HF Llama causal LM) for the duration of the block."""
        handles = [hf.get_input_embeddings().register_forward_hook(self._on_embed)]
        for index, layer in enumerate(hf.model.layers):
            attn = layer.self_attn
            handles += [
                layer.input_layernorm.register_forward_pre_hook(self._layer_hook(self._on_resid_pre, index)),
                layer.post_attention_layernorm.register_forward_pre_hook(self._layer_hook(self._on_mlp_in, index)),
                layer.mlp.register_forward_hook(self._layer_hook(self._on_mlp_out, index)),
                attn.o_proj.register_forward_pre_hook(self._layer_hook(self._on_o_proj, index)),
            ]
            for kind, name in enumerate(("q_proj", "k_proj", "v_proj")):
                hook = self._layer_hook(self._on_projection, index, kind, layer.input_layernorm)
                handles.append(getattr(attn, name).register_forward_hook(hook))
        handles.append(hf.model.norm.register_forward_pre_hook(self._on_logits_in))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    def _layer_hook(method, *bound):
        return lambda module, *args: method(module, *bound, *args)

    # -- writers

    def _record(self, rows: slice | int, write: torch.Tensor) -> None:
        """Store a write ([b, p, d] or [b, p, k, d]) and, when edge patching, its corrupted - actual."""
        write = write.detach()
        block = write.movedim(2, 0) if write.dim() == 4 else write
        self.writes[rows] = block
        if self.keep_edges is not None:
            diff = self.corrupted.writes[rows] - block
            self._diffs[rows] = diff
            self._prefix_diff = self._prefix_diff + (diff.sum(0) if diff.dim() == 4 else diff)

    def _on_embed(self, module, args, output):
        b, p, d = output.shape
        self.writes = output.new_zeros(self.layout.n_rows, b, p, d)
        if self.corrupted is not None and self.corrupted.writes.shape[1:] != output.shape:
            raise CircuitError(
                f"the corrupted recording has writes {tuple(self.corrupted.writes.shape[1:])} but this run "
                f"{tuple(output.shape)}: clean and corrupted batches must have the same shape"
            )
        if self.keep_edges is not None:
            if self.keep_edges.dim() == 3 and self.keep_edges.shape[2] < p:
                raise CircuitError(f"per-position edges cover {self.keep_edges.shape[2]} positions but this run has {p}")
            self._diffs = torch.zeros_like(self.writes)
            self._prefix_diff = output.new_zeros(b, p, d)
        self._record(0, output)

    def _on_o_proj(self, module, layer, args):
        (z,) = args
        if self.keep_heads is not None:
            z = patch_heads(z, self.corrupted.z[layer], self.keep_heads[layer])
        self.z.append(z.detach())
        rows = slice(self.layout.head_row(layer, 0), self.layout.mlp_row(layer))
        self._record(rows, head_writes(z, module.weight, self.layout.n_heads))
        return (z,)

    def _on_mlp_out(self, module, layer, args, output):
        if self.keep_mlps is not None and not self.keep_mlps[layer]:
            output = self.corrupted.writes[self.layout.mlp_row(layer)].to(output.dtype)
        self._record(self.layout.mlp_row(layer), output)
        return output

    # -- readers

    def _reader_delta(self, cols: slice, shape_like: torch.Tensor) -> torch.Tensor | None:
        """The perturbation added to the inputs of columns `cols`: [b, p, C, d], or None."""
        n_cols = cols.stop - cols.start
        if self.keep_edges is not None:
            n_rows = int(self.layout.rows_read()[cols.start])
            keep = self.keep_edges[:n_rows, cols]
            if keep.dim() == 3:
                keep = keep[:, :, keep.shape[2] - self._prefix_diff.shape[1]:]  # positions counted from the end
            return removed_input(self._prefix_diff, self._diffs[:n_rows], keep)
        if self.track_grads:
            b, p, d = shape_like.shape
            delta = shape_like.new_zeros(b, p, n_cols, d, requires_grad=True)
            self.perturbations[cols.start] = delta
            return delta
        return None

    def _on_resid_pre(self, module, layer, args):
        (self._resid,) = args
        delta = self._reader_delta(self.layout.head_cols(layer), self._resid)
        if delta is not None:
            delta = delta.unflatten(2, (self.layout.n_heads, self.layout.n_inputs))
        self._head_delta = delta

    def _on_projection(self, module, layer, kind, norm, args, output):
        if self._head_delta is None:
            return output
        delta = self._head_delta[:, :, :, kind if self.layout.split_qkv else 0]
        return per_head_projection(self._resid, delta, norm, module.weight).to(output.dtype)

    def _on_mlp_in(self, module, layer, args):
        col = self.layout.mlp_col(layer)
        delta = self._reader_delta(slice(col, col + 1), args[0])
        return None if delta is None else (args[0] + delta[:, :, 0],)

    def _on_logits_in(self, module, args):
        col = self.layout.logits_col
        delta = self._reader_delta(slice(col, col + 1), args[0])
        return None if delta is None else (args[0] + delta[:, :, 0],)

    def input_grads(self) -> Iterator[tuple[int, torch.Tensor]]:
        """After backward: (first column, d metric / d input [C, b, p, d]) per reader group."""
        for start, delta in self.perturbations.items():
            if delta.grad is None:
                raise CircuitError("no gradient reached a reader input; call backward on the metric first")
            yield start, delta.grad.movedim(2, 0)


# --------------------------------------------------------------------------------------------------
# Runs


@dataclass
class PreparedModel:
    """A frozen multi-head copy of the model, its HF module, layout and ids -> logits function."""

    module: nn.Module
    hf: nn.Module
    layout: ComponentLayout
    forward: Callable[[torch.Tensor], torch.Tensor]
    gate_gradient: str = "none"

    @contextlib.contextmanager
    def gradient_gates(self) -> Iterator[None]:
        """For EAP's gradient pass: hard gates with the straight-through gradient (training mode without
        noise, the same forward values) when asked for and the model has gates; otherwise unchanged."""
        module = self.module
        if self.gate_gradient != "straight_through" or not isinstance(module, GatedModel) or module.mode != "eval":
            yield
            return
        module.set_mode("train", noise=False)
        try:
            yield
        finally:
            module.set_mode("eval")


def prepare(model: nn.Module, split_qkv: bool = True, gate_gradient: str = "none") -> PreparedModel:
    """Copy `model` (a GatedModel in 'dense' or 'eval' mode, or a HF Llama) for component circuits."""
    if isinstance(model, GatedModel) and model.mode == "train":
        raise CircuitError("the gated model is in 'train' mode (random gates); set_mode('eval') or 'dense' first")
    module = multi_head_copy(model).eval()
    hf = module.model if isinstance(module, GatedModel) else module
    layout = ComponentLayout(hf.config.num_hidden_layers, hf.config.num_attention_heads, split_qkv)
    return PreparedModel(module, hf, layout, logits_fn(module), gate_gradient)


def _last_logits(prepared: PreparedModel, hooks: ComponentHooks, ids: torch.Tensor) -> torch.Tensor:
    with hooks.attached(prepared.hf):
        return prepared.forward(ids)[:, -1].float()  # [b, vocab]


@torch.no_grad()
def record(prepared: PreparedModel, ids: torch.Tensor) -> tuple[Recording, torch.Tensor]:
    """Run `ids` unpatched: (its Recording, last-position logits [b, vocab])."""
    hooks = ComponentHooks(prepared.layout)
    logits = _last_logits(prepared, hooks, ids)
    return Recording(hooks.writes, torch.stack(hooks.z)), logits


@torch.no_grad()
def patched_metric(prepared: PreparedModel, batch: PromptBatch, corrupted: Recording, **keep) -> torch.Tensor:
    """Per-prompt logit diff [b] of the clean batch with everything not in `keep` (keep_heads and/or
    keep_mlps, or keep_edges) patched from the corrupted recording."""
    hooks = ComponentHooks(prepared.layout, corrupted=corrupted, **keep)
    return logit_diff(_last_logits(prepared, hooks, batch.clean), batch)


def edge_attribution(prepared: PreparedModel, batch: PromptBatch, corrupted: Recording,
                     n_positions: int | None = None) -> torch.Tensor:
    """EAP scores summed over the batch's prompts: [U, V], or with `n_positions` per position [U, V, P]
    (the batch's p positions are the last p of P); zero where no edge exists."""
    hooks = ComponentHooks(prepared.layout, track_grads=True)
    with torch.enable_grad(), prepared.gradient_gates():
        logit_diff(_last_logits(prepared, hooks, batch.clean), batch).sum().backward()
    diffs = corrupted.writes - hooks.writes  # [U, b, p, d]
    n_pos = diffs.shape[2]
    if n_positions is not None and n_positions < n_pos:
        raise CircuitError(f"n_positions={n_positions} is shorter than this batch's {n_pos} positions")
    shape = (prepared.layout.n_rows, prepared.layout.n_cols) + (() if n_positions is None else (n_positions,))
    scores = torch.zeros(shape)
    for start, grads in hooks.input_grads():  # grads [C, b, p, d]
        cols = slice(start, start + grads.shape[0])
        if n_positions is None:
            scores[:, cols] = torch.einsum("ubpd,cbpd->uc", diffs, grads)
        else:
            scores[:, cols, n_positions - n_pos:] = torch.einsum("ubpd,cbpd->ucp", diffs, grads)
    allowed = prepared.layout.allowed()
    return scores * (allowed if n_positions is None else allowed[:, :, None])


@dataclass
class Curve:
    """Explained effect against the number of components kept, and the count reaching the target."""

    total: int
    counts: list[int]
    effects: list[float]
    count_at_target: int | None  # first crossing (see count_to_reach)
    count_stays_above: int | None  # smallest evaluated count from which every evaluated count reaches it
    metric_full: float
    metric_empty: float
    top: list[tuple[str, float]]  # best-ranked components with their EAP scores


@dataclass
class CircuitResult:
    """Component circuit of one model on one task: EAP ranking checked by activation patching."""

    task: str
    n_prompts: int
    metric_clean: float
    metric_corrupted: float
    heads: Curve
    edges: Curve
    config: dict
    position_edges: Curve | None = None  # edges resolved by position (config.position_edges)

    def to_json(self) -> dict:
        return asdict(self)


class PromptSet:
    """Encoded batches with their corrupted recordings, evaluated together as one mean metric."""

    def __init__(self, prepared: PreparedModel, batches: list[PromptBatch]):
        self.prepared, self.batches = prepared, batches
        self.recordings, corrupted_metrics = [], []
        for batch in batches:
            recording, logits = record(prepared, batch.corrupted)
            self.recordings.append(recording)
            corrupted_metrics.append(logit_diff(logits, batch))
        self.n_prompts = sum(len(b.indices) for b in batches)
        self.n_positions = max(b.clean.shape[1] for b in batches)  # per-position edges count from the end
        self.metric_corrupted = torch.cat(corrupted_metrics).mean().item()

    def mean_metric(self, **keep) -> float:
        """Mean logit diff over the prompts with `keep` (see patched_metric); no keep = the clean run."""
        total = sum(patched_metric(self.prepared, b, r, **keep).sum() for b, r in zip(self.batches, self.recordings))
        return float(total) / self.n_prompts

    def edge_scores(self, by_position: bool = False) -> torch.Tensor:
        """Mean EAP score per edge over the prompts: [U, V], or by position [U, V, n_positions] (its sum
        over positions is the [U, V] score)."""
        n_positions = self.n_positions if by_position else None
        total = sum(edge_attribution(self.prepared, b, r, n_positions) for b, r in zip(self.batches, self.recordings))
        return total / self.n_prompts


def head_scores(edge_scores: torch.Tensor, layout: ComponentLayout) -> torch.Tensor:
    """Node EAP score of every head, the sum of its out-edges' scores.  [U, V] -> [L, H]."""
    rows = [layout.head_row(layer, 0) + h for layer in range(layout.n_layers) for h in range(layout.n_heads)]
    return edge_scores[rows].sum(1).view(layout.n_layers, layout.n_heads)


def _check_effect(kind: str, full: float, empty: float) -> None:
    if abs(full - empty) < 1e-6:
        raise CircuitError(f"patching every {kind} leaves the metric at {full:.4g}: the corruption does not "
                           "change this model's answer on these prompts, so no effect can be explained")


def head_curve(prompt_set: PromptSet, edge_scores: torch.Tensor, metric_clean: float,
               config: ComponentCircuitConfig) -> Curve:
    """Explained effect with the top-k heads by |node EAP| kept (others patched), MLPs always kept."""
    layout = prompt_set.prepared.layout
    scores = head_scores(edge_scores, layout)  # [L, H]
    all_heads = torch.ones(scores.shape, dtype=torch.bool)
    empty = prompt_set.mean_metric(keep_heads=~all_heads)
    _check_effect("head", metric_clean, empty)

    def effect(k: int) -> float:
        keep = top_k_mask(scores, all_heads, k)
        return explained_effect(prompt_set.mean_metric(keep_heads=keep), metric_clean, empty)

    count, effects = count_to_reach(effect, count_grid(scores.numel(), config.curve_points), config.target,
                                    config.refine)
    names = [f"blocks.{layer}.head.{h}" for layer in range(layout.n_layers) for h in range(layout.n_heads)]
    top = _ranked(scores.flatten(), config.top_stored, names.__getitem__)
    return Curve(scores.numel(), list(effects), list(effects.values()), count,
                 count_staying_above(effects, config.target), metric_clean, empty, top)


def edge_curve(prompt_set: PromptSet, edge_scores: torch.Tensor, metric_clean: float,
               config: ComponentCircuitConfig) -> Curve:
    """Explained effect with the top-k edges by |EAP| kept (all others patched).  edge_scores [U, V], or
    [U, V, P] for edges resolved by position."""
    layout = prompt_set.prepared.layout
    allowed = layout.allowed()
    if edge_scores.dim() == 3:
        allowed = allowed[:, :, None].expand(edge_scores.shape).contiguous()
    empty = prompt_set.mean_metric(keep_edges=torch.zeros_like(allowed))
    _check_effect("edge", metric_clean, empty)

    def effect(k: int) -> float:
        keep = top_k_mask(edge_scores, allowed, k)
        return explained_effect(prompt_set.mean_metric(keep_edges=keep), metric_clean, empty)

    total = int(allowed.sum())
    count, effects = count_to_reach(effect, count_grid(total, config.curve_points), config.target, config.refine)
    rows, cols = layout.row_names(), layout.col_names()
    n_pos = edge_scores.shape[2] if edge_scores.dim() == 3 else 1

    def name(i: int) -> str:  # per position: "@-1" is the last token
        edge, pos = divmod(i, n_pos)
        where = f" @{pos - n_pos}" if edge_scores.dim() == 3 else ""
        return f"{rows[edge // layout.n_cols]} -> {cols[edge % layout.n_cols]}{where}"

    top = _ranked(edge_scores.masked_fill(~allowed, 0).flatten(), min(config.top_stored, total), name)
    return Curve(total, list(effects), list(effects.values()), count, count_staying_above(effects, config.target),
                 metric_clean, empty, top)


def run(config: ComponentCircuitConfig, model: nn.Module, tokenizer, prompts: Sequence[TaskPrompt]) -> CircuitResult:
    """Rank heads and edges by EAP on `prompts`, then trace explained effect against the number kept."""
    return run_prepared(config, prepare(model, config.split_qkv, config.gate_gradient), tokenizer, prompts)


def run_prepared(config: ComponentCircuitConfig, prepared: PreparedModel, tokenizer, prompts: Sequence[TaskPrompt]
                 ) -> CircuitResult:
    """`run` on a model already prepared (with config's split_qkv and gate_gradient), so callers that trace
    several prompt sets copy the model once."""
    if not prompts:
        raise CircuitError("component circuits need at least one prompt")
    prompt_set = PromptSet(prepared, encode_prompts(prompts, tokenizer, config.batch_size))
    position_scores = prompt_set.edge_scores(by_position=True) if config.position_edges else None  # [U, V, P]
    scores = position_scores.sum(-1) if config.position_edges else prompt_set.edge_scores()  # [U, V]
    metric_clean = prompt_set.mean_metric()
    return CircuitResult(
        task=prompts[0].task, n_prompts=prompt_set.n_prompts, metric_clean=metric_clean,
        metric_corrupted=prompt_set.metric_corrupted, heads=head_curve(prompt_set, scores, metric_clean, config),
        edges=edge_curve(prompt_set, scores, metric_clean, config), config=config.model_dump(),
        position_edges=None if position_scores is None else edge_curve(prompt_set, position_scores, metric_clean,
                                                                      config),
    )


def run_per_prompt(config: ComponentCircuitConfig, model: nn.Module, tokenizer, prompts: Sequence[TaskPrompt]
                   ) -> list[CircuitResult | str]:
    """One circuit per prompt (its own EAP ranking and patching curves): its CircuitResult, or why it has none
    (the corruption does not move that prompt's metric). Per-prompt sizes give intervals over prompts."""
    return run_prepared_per_prompt(config, prepare(model, config.split_qkv, config.gate_gradient), tokenizer, prompts)


def run_prepared_per_prompt(config: ComponentCircuitConfig, prepared: PreparedModel, tokenizer,
                            prompts: Sequence[TaskPrompt]) -> list[CircuitResult | str]:
    """`run_per_prompt` on a model already prepared: one copy of the model serves every prompt."""
    results: list[CircuitResult | str] = []
    for prompt in prompts:
        try:
            results.append(run_prepared(config, prepared, tokenizer, [prompt]))
        except CircuitError as error:
            results.append(str(error))
    return results


def compare_per_prompt(dense: Sequence[CircuitResult | str], sparse: Sequence[CircuitResult | str],
                       samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Per kind, over the prompts whose dense and sparse circuits both reach the target: the counts, their
    means, and mean(dense) / mean(sparse) with a percentile-bootstrap CI (prompts resampled in pairs)."""
    if len(dense) != len(sparse):
        raise CircuitError(f"{len(dense)} dense but {len(sparse)} sparse per-prompt circuits: they pair by prompt")
    rng = np.random.default_rng(seed)
    summary: dict = {"n_prompts": len(dense), "confidence": confidence}
    for kind in CURVE_KINDS:
        curves = [(getattr(d, kind, None), getattr(s, kind, None)) for d, s in zip(dense, sparse)]
        if all(d is None or s is None for d, s in curves):
            continue
        pairs = [(d.count_at_target, s.count_at_target) for d, s in curves if d is not None and s is not None
                 and d.count_at_target is not None and s.count_at_target is not None]
        dense_counts = np.array([d for d, _ in pairs], dtype=np.float64)
        sparse_counts = np.array([s for _, s in pairs], dtype=np.float64)
        ratio, low, high = bootstrap_ratio(dense_counts, sparse_counts, samples, confidence, rng)
        summary[kind] = {
            "n_pairs": len(pairs), "dense_counts": dense_counts.astype(int).tolist(),
            "sparse_counts": sparse_counts.astype(int).tolist(),
            "dense_mean": float(dense_counts.mean()) if pairs else None,
            "sparse_mean": float(sparse_counts.mean()) if pairs else None,
            "ratio": ratio, "ci_low": low, "ci_high": high,
        }
    return summary


def _ranked(scores: torch.Tensor, k: int, name: Callable[[int], str]) -> list[tuple[str, float]]:
    """The k entries with the largest |score|, named, with their signed scores."""
    order = torch.sort(scores.abs(), descending=True, stable=True).indices[:k]
    return [(name(i), scores[i].item()) for i in order.tolist()]


def compare(dense: CircuitResult, sparse: CircuitResult) -> dict:
    """Dense / sparse ratio of the heads and edges needed to reach the target explained effect, for the
    first crossing and for the count from which the curve stays above the target."""
    def ratio(a: int | None, b: int | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    summary: dict = {"task": dense.task, "target": dense.config["target"]}
    for kind in CURVE_KINDS:
        d, s = getattr(dense, kind), getattr(sparse, kind)
        if d is None or s is None:
            continue
        summary[kind] = {
            "dense": d.count_at_target, "sparse": s.count_at_target, "ratio": ratio(d.count_at_target, s.count_at_target),
            "dense_stays_above": d.count_stays_above, "sparse_stays_above": s.count_stays_above,
            "ratio_stays_above": ratio(d.count_stays_above, s.count_stays_above),
        }
    return summary


# --------------------------------------------------------------------------------------------------
# Entry point: dense SmolLM2 vs a sparse checkpoint on one task


def main(argv: Sequence[str] | None = None) -> None:
    from attribution.tasks import TASKS, load_task
    from sparse_attention.gated_attention import load_gated_model
    from sparse_attention.models import load_model

    parser = argparse.ArgumentParser(description="dense vs sparse component circuits, per task")
    parser.add_argument("--tasks", nargs="+", default=["ioi"], choices=TASKS)
    parser.add_argument("--n", type=int, default=20, help="prompts per task (the first n of its file)")
    parser.add_argument("--dense", default="smollm2-135m", help="model name for load_model")
    parser.add_argument("--sparse", type=Path, help="gated checkpoint directory (load_gated_model), eval mode")
    parser.add_argument("--joint-qkv", action="store_true", help="one input per head instead of q/k/v")
    parser.add_argument("--points", type=int, default=20, help="counts on each curve")
    parser.add_argument("--gate-gradient", choices=["none", "straight_through"], default="straight_through",
                        help="gates' gradient when ranking edges of the sparse model by EAP")
    parser.add_argument("--out", type=Path, required=True, help="JSON file: results, ratios, config")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--per-prompt", action="store_true",
                        help="one circuit per prompt instead of one over all: per-prompt sizes, ratio with a bootstrap CI")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = ComponentCircuitConfig(split_qkv=not args.joint_qkv, curve_points=args.points,
                                    gate_gradient=args.gate_gradient)
    models = {"dense": load_model(args.dense)}
    if args.sparse is not None:
        sparse, tokenizer = load_gated_model(args.sparse)
        models["sparse"] = (sparse.set_mode("eval"), tokenizer)
    out: dict = {"models": {"dense": args.dense, "sparse": str(args.sparse) if args.sparse else None},
                 "config": config.model_dump(), "tasks": {}}
    for task in args.tasks:
        prompts = load_task(task)[: args.n]
        if args.per_prompt:
            per_prompt = {name: run_per_prompt(config, model, tokenizer, prompts)
                          for name, (model, tokenizer) in models.items()}
            out["tasks"][task] = {"per_prompt": {name: [r if isinstance(r, str) else r.to_json() for r in results]
                                                 for name, results in per_prompt.items()}}
            if "sparse" in per_prompt:
                summary = compare_per_prompt(per_prompt["dense"], per_prompt["sparse"])
                out["tasks"][task]["per_prompt_comparison"] = summary
                for kind in CURVE_KINDS:
                    if kind in summary:
                        k = summary[kind]
                        print(f"{task} {kind}: {k['n_pairs']}/{summary['n_prompts']} prompts, dense/sparse "
                              f"{k['ratio']:.2f} (CI {k['ci_low']:.2f}-{k['ci_high']:.2f})", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=2) + "\n")
            continue
        results = {name: run(config, model, tokenizer, prompts) for name, (model, tokenizer) in models.items()}
        out["tasks"][task] = {name: result.to_json() for name, result in results.items()}
        if "sparse" in results:
            out["tasks"][task]["comparison"] = compare(results["dense"], results["sparse"])
        for name, result in results.items():
            print(f"{task} {name}: metric clean {result.metric_clean:.3f} corrupted {result.metric_corrupted:.3f}; "
                  f"heads to {config.target}: {result.heads.count_at_target}/{result.heads.total}, "
                  f"edges: {result.edges.count_at_target}/{result.edges.total}" + (
                      "" if result.position_edges is None else
                      f", edges by position: {result.position_edges.count_at_target}/{result.position_edges.total}"),
                  flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every task, so a long run keeps results


if __name__ == "__main__":
    main()
