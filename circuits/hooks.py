"""The model copy that component circuits run on, and the forward hooks that record and patch it.

Verification is activation patching in the usual "corrupted into clean" direction: run the clean
prompt; a removed edge u -> v feeds v u's write from the corrupted run instead of u's write in this
run; a removed head has its output replaced by its corrupted output. Ranking (`edge_attribution`) is
attribution patching: the hooks add zero perturbations to every reader's input, whose gradients are
d metric / d (input of v).

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

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from circuits.config import CircuitError
from circuits.layout import ComponentLayout, head_writes, patch_heads, per_head_projection, removed_input
from prompts.batches import PromptBatch
from prompts.metrics import logit_diff, logits_fn
from sparse_attention.gated_attention import GatedModel

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
