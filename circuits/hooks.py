"""The model copy that component circuits run on, and the hook functions that record and patch it.

Verification is activation patching in the usual "corrupted into clean" direction: run the clean
prompt; a removed edge u -> v feeds v u's write from the corrupted run instead of u's write in this
run; a removed head has its output replaced by its corrupted output. Ranking (`edge_attribution`) is
attribution patching: the hooks add zero perturbations to every reader's input, whose gradients are
d metric / d (input of v).

Gates (GatedModel in "eval" mode) are handled one way per run, the same in ranking and verification
(`PreparedModel.gates`): "frozen" holds every gate at the clean run's hard mask (`GatedModel.frozen_gates`)
in every patched, interpolated and gradient pass, so the circuit is a fixed structure and the gradient
(gates constant) is the gradient of the function that patching verifies; "recomputed" lets every pass
compute its own hard gates from its own inputs (the model as it runs), where the hard gate's gradient is
zero, so the gradient pass may use training's straight-through estimator instead (`gate_gradient`).
The corrupted run always runs as it runs (its own gates). Ranking is EAP (one gradient pass on the clean
run) or EAP-IG (Hanna et al. 2024: gradients averaged over runs whose token embedding is interpolated
between the corrupted and the clean one), and for heads exact single-head patching.

Every place read or patched is a named hook point (sparse_attention/hook_points.py): writes are
`hook_embed`, `attn.hook_z` (split per head by the output projection) and `hook_mlp_out`; readers are
`hook_{q,k,v}_input` (one input per head), `hook_mlp_in` and `hook_resid_final` (the logits).
Each head must get its own input, and grouped-query heads share k/v projections, so the model is
copied with its k / v projections expanded to one KV head per query head (an exactly equivalent model).

Families with a norm on the attention output (Gemma's post_attention_layernorm, `blocks.{l}.ln1_post`) add
N(sum_h w_h) to the residual, not the heads' writes w_h, so removed edges out of a layer's heads are not a sum
of per-head terms. A reader then sees, per earlier layer, N(A + sum over its removed heads of (corrupted -
actual w_h)) - N(A) (A = the layer's attention output before the norm in this run) besides the sum over its
removed embedding and MLP writes (those are added as they are). This is exact; node patching (a head's z)
runs through the model's own norm anyway. EAP scores a head's edge by N(A + corrupted - clean w_h) - N(A)
(the single-head patch through the norm) against the reader's gradient (`post_norm_diffs`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import nn

from circuits.config import CircuitError
from circuits.layout import ComponentLayout, head_writes, patch_heads, removed_input
from prompts.batches import PromptBatch
from prompts.metrics import logit_diff, logits_fn
from runtime.precision import Precision, check_precision, store_linear_weights_in_bf16_
from sparse_attention import hook_points
from sparse_attention.architectures import architecture, require
from sparse_attention.gated_attention import gate_mode

# --------------------------------------------------------------------------------------------------
# The model copy and its hooks


def multi_head_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` (GatedModel or HF causal LM of a family circuits support) whose k / v
    projections have one KV head per query head (weights and biases repeated per group), so every head can
    read its own input. Same function exactly."""
    copied = copy.deepcopy(model).requires_grad_(False)
    cfg = hook_points.hf_model(copied).config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for layer in range(len(hook_points.layers(copied))):
        if hook_points.module(copied, f"blocks.{layer}.attn.o").bias is not None:
            raise CircuitError("an output projection with a bias cannot be split into per-head writes")
        for kind in "kv":
            old = hook_points.module(copied, f"blocks.{layer}.attn.{kind}")
            weight = old.weight.view(n_kv, -1, old.in_features).repeat_interleave(n_heads // n_kv, dim=0)
            new = nn.Linear(old.in_features, weight.shape[0] * weight.shape[1], bias=old.bias is not None)
            new.weight = nn.Parameter(weight.flatten(0, 1).clone(), requires_grad=False)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.view(n_kv, -1).repeat_interleave(n_heads // n_kv, dim=0).flatten(),
                                        requires_grad=False)
            hook_points.replace_module(copied, f"blocks.{layer}.attn.{kind}", new)
        hook_points.module(copied, f"blocks.{layer}.attn").num_key_value_groups = 1
    cfg.num_key_value_heads = n_heads
    return copied


def post_attention_norms(model: nn.Module) -> list[nn.Module] | None:
    """Per layer the norm on the attention output (Gemma's post_attention_layernorm), or None for a family that
    adds the attention output to the residual as it is."""
    if not architecture(model).has("blocks.{l}.ln1_post"):
        return None
    return [hook_points.module(model, f"blocks.{layer}.ln1_post") for layer in range(len(hook_points.layers(model)))]


def post_norm_diffs(diffs: torch.Tensor, clean_writes: torch.Tensor, layout: ComponentLayout,
                    norms: list[nn.Module]) -> torch.Tensor:
    """Each head's corrupted - clean write as it reaches the residual through its layer's attention-output norm:
    N(A + diff_h) - N(A), A the clean attention output before the norm; other rows unchanged.
    diffs, clean_writes [U, b, p, d] -> [U, b, p, d]."""
    diffs = diffs.clone()
    for layer, norm in enumerate(norms):
        rows = slice(layout.head_row(layer, 0), layout.mlp_row(layer))
        attn = clean_writes[rows].sum(0)  # [b, p, d]
        diffs[rows] = norm(attn[None] + diffs[rows]) - norm(attn)[None]
    return diffs


@dataclass
class Recording:
    """One run's writes: rows of the layout [U, b, p, d] and each layer's attn.hook_z [L, b, p, H * dh]."""

    writes: torch.Tensor
    z: torch.Tensor


@dataclass
class ComponentHooks:
    """Hook functions for one forward pass: record writes, and optionally patch.

    Exactly one of: nothing (record), `keep_heads`/`keep_mlps` (node patching from `corrupted`),
    `keep_edges` (edge patching from `corrupted`), `track_grads` (zero input perturbations whose
    gradients are d metric / d reader input). With `stacked`, keep_edges has a leading copy dimension
    [K, ...] and the run's batch is K copies of the corrupted recording's batch (copy-major), copy k
    patched with keep_edges[k].
    """

    layout: ComponentLayout
    corrupted: Recording | None = None
    keep_heads: torch.Tensor | None = None  # [L, H] bool
    keep_mlps: torch.Tensor | None = None  # [L] bool
    keep_edges: torch.Tensor | None = None  # [(K,) U, V] bool, or [(K,) U, V, R] per token role (with token_roles)
    token_roles: torch.Tensor | None = None  # [b, p] long: each token's role, an index into keep_edges' last dim
    stacked: bool = False  # keep_edges [K, ...]: K patched copies of the batch in one run
    track_grads: bool = False
    embed_mix: float | None = None  # EAP-IG: the run reads corrupted + embed_mix * (clean - corrupted) embeddings
    writes: torch.Tensor | None = None  # [U, b, p, d], filled during the forward (not when edge patching)
    z: list[torch.Tensor] = field(default_factory=list)  # per layer [b, p, H * dh]
    perturbations: dict[int, torch.Tensor] = field(default_factory=dict)  # first column -> [C, b, p, d]
    # edge patching, per token group (all tokens, or the tokens of one role): its tokens (indices into the
    # flattened [b * p], None = all), its kept edges [K, U, V], the differences corrupted - actual [K, U, n, d]
    # of the rows written so far, and their sum [K, n, d]
    _group_tokens: list[torch.Tensor | None] = field(default_factory=list)
    _group_keep: list[torch.Tensor] = field(default_factory=list)
    _diffs: list[torch.Tensor] = field(default_factory=list)
    _prefix_diff: list[torch.Tensor] = field(default_factory=list)
    _rows_read: list[int] = field(default_factory=list)
    _head_delta: torch.Tensor | None = None  # [K, H, n_inputs, b, p, d] current layer's head-input perturbation
    _head_changed: list[torch.Tensor | None] = field(default_factory=list)  # per input kind: the heads [m] whose
    # input changes (in some copy), None if none does
    post_norms: list[nn.Module] | None = None  # per layer the norm on the attention output, if the family has one
    # post-norm edge patching, per token group: per layer written so far, the attention output before the norm
    # A [K, n, d] and its heads' corrupted - actual [K, H, n, d] (their rows of _diffs stay zero)
    _attn_pre: list[list[torch.Tensor]] = field(default_factory=list)
    _head_diffs: list[list[torch.Tensor]] = field(default_factory=list)

    def __post_init__(self):
        patches = (self.keep_heads is not None or self.keep_mlps is not None) + (self.keep_edges is not None)
        if patches + self.track_grads > 1:
            raise CircuitError("ComponentHooks does one of node patching, edge patching or gradient tracking")
        if (patches or self.embed_mix is not None) and self.corrupted is None:
            raise CircuitError("patching and embedding interpolation need the corrupted run's Recording")
        if self.stacked and self.keep_edges is None:
            raise CircuitError("stacked copies are for edge patching: give keep_edges [K, U, V(, R)]")
        self._rows_read = self.layout.rows_read().tolist()

    @property
    def copies(self) -> int:
        """How many patched copies of the batch this run holds."""
        return self.keep_edges.shape[0] if self.stacked else 1

    def hook_fns(self, model: nn.Module) -> dict[str, hook_points.HookFn]:
        """Hook point -> function, for `model` (the multi-head copy: a GatedModel or HF causal LM)."""
        fns: dict[str, hook_points.HookFn] = {"hook_embed": self._on_embed}
        self.post_norms = post_attention_norms(model)
        for layer in range(self.layout.n_layers):
            o_weight = hook_points.module(model, f"blocks.{layer}.attn.o").weight
            fns[f"blocks.{layer}.hook_resid_pre"] = partial(self._on_resid_pre, layer)
            for kind, name in enumerate("qkv"):
                fns[f"blocks.{layer}.hook_{name}_input"] = partial(self._on_head_input, kind)
            fns[f"blocks.{layer}.attn.hook_z"] = partial(self._on_z, layer, o_weight)
            fns[f"blocks.{layer}.hook_mlp_in"] = partial(self._on_mlp_in, layer)
            fns[f"blocks.{layer}.hook_mlp_out"] = partial(self._on_mlp_out, layer)
        fns["hook_resid_final"] = self._on_logits_in
        return fns

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[ComponentHooks]:
        """Attach the hook functions to `model` for the duration of the block."""
        with hook_points.hooks(model, self.hook_fns(model)):
            yield self

    # -- writers

    def _record(self, rows: slice | int, write: torch.Tensor, post_norm: bool = False) -> None:
        """Store a write ([B, p, d] or [B, p, k, d]) or, when edge patching, its corrupted - actual per group;
        `post_norm`: heads whose layer's sum passes a norm, kept apart from the additive rows (`_post_norm_delta`)."""
        write = write.detach()
        block = write.movedim(2, 0) if write.dim() == 4 else write
        if self.keep_edges is None:
            self.writes[rows] = block
            return
        rows = slice(rows, rows + 1) if isinstance(rows, int) else rows
        block = block[None] if write.dim() == 3 else block  # [k, B, p, d]
        corrupted = self.corrupted.writes[rows]  # [k, b, p, d]
        k, b, p, d = corrupted.shape
        actual = block.reshape(k, self.copies, b * p, d)  # [k, K, b * p, d]
        diff = corrupted.flatten(1, 2)[:, None] - actual  # [k, K, b * p, d]
        for group, tokens in enumerate(self._group_tokens):
            part = diff if tokens is None else diff[:, :, tokens]  # [k, K, n, d]
            if post_norm:
                self._diffs[group][:, rows] = 0  # not part of the additive sum
                attn = actual.sum(0) if tokens is None else actual.sum(0)[:, tokens]  # [K, n, d]
                self._attn_pre[group].append(attn)
                self._head_diffs[group].append(part.transpose(0, 1))  # [K, H, n, d]
                continue
            self._diffs[group][:, rows] = part.transpose(0, 1)
            self._prefix_diff[group] += part.sum(0)

    def _on_embed(self, output: torch.Tensor) -> torch.Tensor | None:
        batch, p, d = output.shape
        if self.corrupted is not None:
            b = self.corrupted.writes.shape[1]
            if self.corrupted.writes.shape[2:] != output.shape[1:] or batch != b * self.copies:
                raise CircuitError(
                    f"the corrupted recording has writes {tuple(self.corrupted.writes.shape[1:])} but this run "
                    f"{tuple(output.shape)}: clean and corrupted batches must have the same shape"
                    + (f" ({self.copies} copies of it)" if self.stacked else "")
                )
        if self.keep_edges is not None:
            self._start_edge_patching(batch // self.copies, p, d, output.dtype, output.device)
        else:
            self.writes = output.new_zeros(self.layout.n_rows, batch, p, d)
        if self.embed_mix is not None:
            corrupted = self.corrupted.writes[0].to(output.dtype)
            output = corrupted + self.embed_mix * (output - corrupted)
        self._record(0, output)
        return output if self.embed_mix is not None else None

    def _start_edge_patching(self, b: int, p: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        """Token groups (all tokens, or one per role present) with their kept edges and empty differences."""
        keep = self.keep_edges if self.stacked else self.keep_edges[None]  # [K, U, V(, R)]
        if keep.dim() == 4:
            _check_token_roles(self.token_roles, (b, p), keep.shape[3])
            roles = self.token_roles.flatten()
            for role in roles.unique().tolist():
                self._group_tokens.append((roles == role).nonzero().squeeze(1))
                self._group_keep.append(keep[..., role])
        else:
            self._group_tokens.append(None)
            self._group_keep.append(keep)
        n_copies, n_rows = keep.shape[0], self.layout.n_rows
        for tokens in self._group_tokens:  # a row's differences are written before any reader reads them
            n = b * p if tokens is None else len(tokens)
            self._diffs.append(torch.empty(n_copies, n_rows, n, d, dtype=dtype, device=device))
            self._prefix_diff.append(torch.zeros(n_copies, n, d, dtype=dtype, device=device))
            self._attn_pre.append([])
            self._head_diffs.append([])

    def _on_z(self, layer: int, o_weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.keep_heads is not None:
            z = patch_heads(z, self.corrupted.z[layer], self.keep_heads[layer])
        self.z.append(z.detach())
        rows = slice(self.layout.head_row(layer, 0), self.layout.mlp_row(layer))
        self._record(rows, head_writes(z, o_weight, self.layout.n_heads), post_norm=self.post_norms is not None)
        return z

    def _on_mlp_out(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        if self.keep_mlps is not None and not self.keep_mlps[layer]:
            output = self.corrupted.writes[self.layout.mlp_row(layer)].to(output.dtype)
        self._record(self.layout.mlp_row(layer), output)
        return output

    # -- readers

    def _reader_delta(self, cols: slice, shape_like: torch.Tensor) -> torch.Tensor | None:
        """The perturbation added to the inputs of columns `cols`: [K, C, b, p, d], or None (inputs unchanged)."""
        n_cols = cols.stop - cols.start
        if self.keep_edges is not None:
            n_rows = self._rows_read[cols.start]
            parts = [removed_input(prefix, diffs, keep[:, :n_rows, cols])
                     for prefix, diffs, keep in zip(self._prefix_diff, self._diffs, self._group_keep)]
            if self.post_norms is not None:
                parts = [self._post_norm_delta(part, group, cols) for group, part in enumerate(parts)]
            if all(part is None for part in parts):
                return None
            b, p = shape_like.shape[0] // self.copies, shape_like.shape[1]
            if self._group_tokens[0] is None:
                return parts[0].unflatten(2, (b, p))
            delta = shape_like.new_zeros(self.copies, n_cols, b * p, shape_like.shape[-1])
            for tokens, part in zip(self._group_tokens, parts):
                if part is not None:
                    delta[:, :, tokens] = part
            return delta.unflatten(2, (b, p))
        if self.track_grads:
            b, p, d = shape_like.shape
            delta = shape_like.new_zeros(n_cols, b, p, d, requires_grad=True)
            self.perturbations[cols.start] = delta
            return delta[None]
        return None

    def _post_norm_delta(self, part: torch.Tensor | None, group: int, cols: slice) -> torch.Tensor | None:
        """`part` [K, C, n, d] (or None) plus what removed head edges add to the inputs of columns `cols` through
        each earlier layer's attention-output norm: sum over layers of N(A + D) - N(A), D the sum of the removed
        heads' corrupted - actual, for token group `group`."""
        keep = self._group_keep[group]
        for layer, (attn, diffs) in enumerate(zip(self._attn_pre[group], self._head_diffs[group])):
            rows = slice(self.layout.head_row(layer, 0), self.layout.mlp_row(layer))
            removed_edges = ~keep[:, rows, cols]  # [K, H, C]
            if not removed_edges.any():
                continue
            removed = torch.einsum("khnd,khc->kcnd", diffs, removed_edges.to(diffs.dtype))  # [K, C, n, d]
            norm = self.post_norms[layer]
            through = norm(attn[:, None] + removed) - norm(attn)[:, None]
            part = through if part is None else part + through
        return part

    def _changed(self, cols: slice) -> torch.Tensor:
        """[C] bool: the columns some removed edge feeds (in some copy or token group)."""
        n_rows = self._rows_read[cols.start]
        return torch.stack([(~keep[:, :n_rows, cols]).any(1).any(0) for keep in self._group_keep]).any(0)

    def _on_resid_pre(self, layer: int, resid: torch.Tensor) -> None:
        """Before the layer's heads read: their perturbation, computed from the rows written so far."""
        cols = self.layout.head_cols(layer)
        delta = self._reader_delta(cols, resid)
        if delta is not None:
            delta = delta.unflatten(1, (self.layout.n_heads, self.layout.n_inputs))  # [K, H, n_inputs, b, p, d]
            changed = (self._changed(cols).view(self.layout.n_heads, -1) if self.keep_edges is not None
                       else torch.ones(self.layout.n_heads, self.layout.n_inputs, dtype=torch.bool))
            self._head_changed = [heads if len(heads := column.nonzero().squeeze(1)) else None
                                  for column in changed.unbind(1)]
        self._head_delta = delta

    def _on_head_input(self, kind: int, resid: torch.Tensor) -> torch.Tensor | hook_points.HeadInputs | None:
        """resid [B, p, H, d]: the residual each head's q (kind 0), k (1) or v (2) reads. Every head's new input,
        or only those of the heads whose input changes (the others read resid)."""
        kind = kind if self.layout.split_qkv else 0
        if self._head_delta is None or self._head_changed[kind] is None:
            return None
        heads = self._head_changed[kind]  # [m]
        delta = self._head_delta[:, :, kind]  # [K, H, b, p, d]
        if len(heads) == resid.shape[2]:
            return resid + delta.permute(0, 2, 3, 1, 4).reshape(resid.shape)
        b, p, _, d = resid.shape
        inputs = resid[:, :, heads] + delta[:, heads].permute(0, 2, 3, 1, 4).reshape(b, p, len(heads), d)
        return hook_points.HeadInputs(heads, inputs)

    def _single_reader(self, col: int, resid: torch.Tensor) -> torch.Tensor | None:
        delta = self._reader_delta(slice(col, col + 1), resid)
        return None if delta is None else resid + delta[:, 0].reshape(resid.shape)

    def _on_mlp_in(self, layer: int, resid: torch.Tensor) -> torch.Tensor | None:
        return self._single_reader(self.layout.mlp_col(layer), resid)

    def _on_logits_in(self, resid: torch.Tensor) -> torch.Tensor | None:
        return self._single_reader(self.layout.logits_col, resid)

    def input_grads(self) -> Iterator[tuple[int, torch.Tensor]]:
        """After backward: (first column, d metric / d input [C, b, p, d]) per reader group."""
        for start, delta in self.perturbations.items():
            if delta.grad is None:
                raise CircuitError("no gradient reached a reader input; call backward on the metric first")
            yield start, delta.grad


# --------------------------------------------------------------------------------------------------
# Runs


GateHandling = Literal["frozen", "recomputed"]


@dataclass
class PreparedModel:
    """A frozen multi-head copy of the model, its HF causal LM, layout, ids -> logits function, and how its
    gates are handled (`gates`; see the module docstring; a model without hard gates runs the same either way)."""

    module: nn.Module
    hf: nn.Module
    layout: ComponentLayout
    forward: Callable[[torch.Tensor], torch.Tensor]
    gate_gradient: str = "none"
    gates: GateHandling = "recomputed"

    @property
    def has_gates(self) -> bool:
        return gate_mode(self.module) == "eval"

    @property
    def freezes_gates(self) -> bool:
        return self.gates == "frozen" and self.has_gates

    @contextlib.contextmanager
    def gates_of(self, masks: list[torch.Tensor] | None) -> Iterator[None]:
        """Run with these hard gate masks (the clean run's, `clean_masks`) when gates are frozen."""
        if masks is None or not self.freezes_gates:
            yield
            return
        with self.module.frozen_gates(masks):
            yield
    precision: Precision = "fp32"  # the forwards it is prepared for (bf16: Linear weights stored in bf16)

    @contextlib.contextmanager
    def gradient_gates(self) -> Iterator[None]:
        """For EAP's gradient pass: hard gates with the straight-through gradient (training mode without
        noise, the same forward values) when asked for, the model has gates and they are recomputed;
        otherwise unchanged (frozen gates are constants: their gradient is exactly zero)."""
        module = self.module
        if self.gate_gradient != "straight_through" or not self.has_gates or self.freezes_gates:
            yield
            return
        module.set_mode("train", noise=False)
        try:
            yield
        finally:
            module.set_mode("eval")


def prepare(model: nn.Module, split_qkv: bool = True, gate_gradient: str = "none",
            gates: GateHandling = "recomputed", precision: Precision = "fp32") -> PreparedModel:
    """Copy `model` (a GatedModel in 'dense' or 'eval' mode, or a HF causal LM) for component circuits with
    its gates handled as `gates`, run in `precision`: under bf16 the copy's Linear weights are stored in bf16
    (the numbers autocast gives) and its unembedding runs in fp32. ArchitectureError first for a family
    component circuits cannot split exactly."""
    require(model, "circuits")
    if gate_mode(model) == "train":
        raise CircuitError("the gated model is in 'train' mode (random gates); set_mode('eval') or 'dense' first")
    if gates not in ("frozen", "recomputed"):
        raise CircuitError(f"gates must be 'frozen' or 'recomputed', not {gates!r}")
    check_precision(precision, next(model.parameters()).device)  # bf16 without bfloat16 units is refused
    copied = multi_head_copy(model).eval()
    hf = hook_points.hf_model(copied)
    if precision == "bf16":
        unembed = hf.lm_head.weight  # fp32, possibly tied to the embedding
        store_linear_weights_in_bf16_(copied)
        hf.lm_head.weight = unembed
        hf.lm_head = _UnembedInFp32(hf.lm_head)
    layout = ComponentLayout(hf.config.num_hidden_layers, hf.config.num_attention_heads, split_qkv)
    return PreparedModel(copied, hf, layout, logits_fn(copied), gate_gradient, gates, precision)


@torch.no_grad()
def clean_masks(prepared: PreparedModel, ids: torch.Tensor) -> list[torch.Tensor] | None:
    """The hard gate masks of the run on `ids`, per layer bool [b, H, p, p], when `prepared` freezes gates;
    None otherwise (nothing to freeze)."""
    if not prepared.freezes_gates:
        return None
    return prepared.module(input_ids=ids, record_masks=True).gate_record.gate_masks


class _UnembedInFp32(nn.Module):
    """The unembedding in fp32 also under bf16 autocast: a logit difference of two bf16-rounded logits
    is off by up to ~0.06 at logit 16, which is what a circuit's metric would see."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, resid: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., vocab] float32
        with torch.autocast(resid.device.type, enabled=False):
            return self.linear(resid.float())


def _unembed_last(prepared: PreparedModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position [b, vocab] (float32) of a forward on ids [b, p]: all the metric reads. The
    position is given as an index, which HF gathers into a contiguous [b, 1, d]; the slice `logits_to_keep=1`
    is strided, and the unembedding then runs as a batched matmul over a broadcast weight (about 7x slower)."""
    last = torch.tensor([ids.shape[1] - 1], device=ids.device)
    return prepared.module(input_ids=ids, use_cache=False, logits_to_keep=last).logits[:, -1].float()


def _last_logits(prepared: PreparedModel, hooks: ComponentHooks, ids: torch.Tensor) -> torch.Tensor:
    with hooks.attached(prepared.module):
        return _unembed_last(prepared, ids)  # [b, vocab]


@torch.no_grad()
def record(prepared: PreparedModel, ids: torch.Tensor) -> tuple[Recording, torch.Tensor]:
    """Run `ids` unpatched: (its Recording, last-position logits [b, vocab])."""
    hooks = ComponentHooks(prepared.layout)
    logits = _last_logits(prepared, hooks, ids)
    return Recording(hooks.writes, torch.stack(hooks.z)), logits


@torch.no_grad()
def patched_metric(prepared: PreparedModel, batch: PromptBatch, corrupted: Recording,
                   masks: list[torch.Tensor] | None = None, **keep) -> torch.Tensor:
    """Per-prompt logit diff [b] of the clean batch with everything not in `keep` (keep_heads and/or
    keep_mlps, or keep_edges) patched from the corrupted recording; `masks`: the clean run's gates, held
    when `prepared` freezes gates."""
    hooks = ComponentHooks(prepared.layout, corrupted=corrupted, **keep)
    with prepared.gates_of(masks):
        return logit_diff(_last_logits(prepared, hooks, batch.clean), batch)


@torch.no_grad()
def edge_patched_metrics(prepared: PreparedModel, batch: PromptBatch, corrupted: Recording, keeps: torch.Tensor,
                         masks: list[torch.Tensor] | None = None, token_roles: torch.Tensor | None = None,
                         max_tokens: int = 512) -> torch.Tensor:
    """Per-prompt logit diff [K, b] of the clean batch with the edges of keeps[k] kept and every other edge
    patched from the corrupted recording: `patched_metric(keep_edges=keeps[k])` for each k, several masks per
    forward. keeps [K, U, V] bool, or [K, U, V, R] by token role with token_roles [b, p].

    Copies of the batch are stacked along the batch dimension, copy k patched with keeps[k], at most
    `max_tokens` tokens (copies x prompts x positions, at least one copy) per forward: each copy holds every
    writer's difference [U, b, p, d]. Frozen gates: every copy holds the clean run's masks."""
    if keeps.dim() not in (3, 4):
        raise CircuitError(f"keeps must be [K, U, V] or [K, U, V, R] bool masks, got shape {tuple(keeps.shape)}")
    b, p = batch.clean.shape
    metrics = []
    for chunk in keeps.split(max(1, max_tokens // (b * p))):
        n_copies = len(chunk)
        hooks = ComponentHooks(prepared.layout, corrupted=corrupted, keep_edges=chunk, token_roles=token_roles,
                               stacked=True)
        stacked_masks = None if masks is None else [mask.repeat(n_copies, 1, 1, 1) for mask in masks]
        with prepared.gates_of(stacked_masks):
            logits = _last_logits(prepared, hooks, batch.clean.repeat(n_copies, 1)).view(n_copies, b, -1)
        metrics += [logit_diff(copy, batch) for copy in logits]
    return torch.stack(metrics)


def _check_token_roles(token_roles: torch.Tensor | None, shape: tuple[int, int], n_roles: int) -> None:
    """Role-resolved edges need every token's role [b, p], each an index below the number of roles."""
    if token_roles is None:
        raise CircuitError("edges resolved by token role need token_roles, each token's role index [batch, pos]")
    if tuple(token_roles.shape) != shape:
        raise CircuitError(f"token_roles has shape {tuple(token_roles.shape)} but this run's tokens are {shape}")
    if token_roles.min() < 0 or token_roles.max() >= n_roles:
        raise CircuitError(f"token_roles must be indices of the {n_roles} roles but hold "
                           f"{token_roles.min().item()}..{token_roles.max().item()}")


def integration_points(steps: int) -> list[float]:
    """EAP-IG's interpolation points: the midpoints (k - 1/2) / steps of `steps` equal parts of [0, 1]
    (0 = the corrupted embedding, 1 = the clean one)."""
    if steps < 1:
        raise CircuitError(f"EAP-IG needs at least one step, got {steps}")
    return [(k + 0.5) / steps for k in range(steps)]


def edge_attribution(prepared: PreparedModel, batch: PromptBatch, corrupted: Recording,
                     token_roles: torch.Tensor | None = None, masks: list[torch.Tensor] | None = None,
                     ig_steps: int | None = None, n_roles: int | None = None) -> torch.Tensor:
    """Edge scores summed over the batch's prompts: [U, V], or per token role [U, V, n_roles] with
    `token_roles` [b, p] (each token's role index; a role's score sums its tokens'); zero where no edge exists.

    score(u, v) = (corrupted - clean write of u) . g_v, g_v = d metric / d (input of v): on the clean run
    (EAP, `ig_steps` None), or averaged over runs on embeddings interpolated between corrupted and clean
    (EAP-IG, `integration_points(ig_steps)`). `masks`: the clean run's gates, held in every pass when
    `prepared` freezes gates."""
    if token_roles is not None:
        if n_roles is None:
            raise CircuitError("edge scores by token role need n_roles, the number of roles token_roles index")
        _check_token_roles(token_roles, tuple(batch.clean.shape), n_roles)
    alphas = [None] if ig_steps is None else integration_points(ig_steps)
    grads_sum: dict[int, torch.Tensor] = {}
    clean_writes = None
    for alpha in alphas:
        hooks = ComponentHooks(prepared.layout, corrupted=None if alpha is None else corrupted, track_grads=True,
                               embed_mix=alpha)
        with torch.enable_grad(), prepared.gates_of(masks), prepared.gradient_gates():
            logit_diff(_last_logits(prepared, hooks, batch.clean), batch).sum().backward()
        for start, grads in hooks.input_grads():  # grads [C, b, p, d]
            grads_sum[start] = grads_sum[start] + grads if start in grads_sum else grads
        if alpha is None:
            clean_writes = hooks.writes
    if clean_writes is None:
        with prepared.gates_of(masks):
            clean_writes = record(prepared, batch.clean)[0].writes
    diffs = corrupted.writes - clean_writes  # [U, b, p, d]
    norms = post_attention_norms(prepared.module)
    if norms is not None:
        with torch.no_grad():
            diffs = post_norm_diffs(diffs, clean_writes, prepared.layout, norms)
    by_role = token_roles is not None
    if by_role:
        role_of_token = nn.functional.one_hot(token_roles, n_roles).to(diffs.dtype)  # [b, p, R]
    shape = (prepared.layout.n_rows, prepared.layout.n_cols) + ((n_roles,) if by_role else ())
    scores = torch.zeros(shape)
    for start, grads in grads_sum.items():
        grads = grads / len(alphas)
        cols = slice(start, start + grads.shape[0])
        if by_role:
            per_token = torch.einsum("ubpd,cbpd->ucbp", diffs, grads)
            scores[:, cols] = torch.einsum("ucbp,bpr->ucr", per_token, role_of_token)
        else:
            scores[:, cols] = torch.einsum("ubpd,cbpd->uc", diffs, grads)
    allowed = prepared.layout.allowed()
    return scores * (allowed[:, :, None] if by_role else allowed)


# --------------------------------------------------------------------------------------------------
# Single-head patching, many heads per forward


def patch_head_per_copy(z: torch.Tensor, z_corrupted: torch.Tensor, heads: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Copy k of a batch stacked K times takes head heads[k]'s corrupted output, every other head keeps its
    own (per copy, what `patch_heads` gives with heads[k] alone not kept).
    z [K * b, p, H * dh] (copy-major), z_corrupted [b, p, H * dh], heads [K] long  ->  [K * b, p, H * dh]."""
    b, p, _ = z_corrupted.shape
    patched = nn.functional.one_hot(heads, n_heads).bool()[:, None, None, :, None]  # [K, 1, 1, H, 1]
    z = torch.where(patched, z_corrupted.view(1, b, p, n_heads, -1), z.view(len(heads), b, p, n_heads, -1))
    return z.flatten(3).flatten(0, 1)


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer below the patched one: the residual it passes on is replaced by the clean
    run's at the first layer that runs."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def _layers_skipped(model: nn.Module, n_layers: int) -> Iterator[None]:
    """Layers 0 .. n_layers - 1 of `model` pass their input through while the block runs."""
    originals = [hook_points.module(model, f"blocks.{layer}") for layer in range(n_layers)]
    try:
        for layer in range(n_layers):
            hook_points.replace_module(model, f"blocks.{layer}", _SkippedLayer())
        yield
    finally:
        for layer, original in enumerate(originals):
            hook_points.replace_module(model, f"blocks.{layer}", original)


@torch.no_grad()
def clean_residuals(prepared: PreparedModel, ids: torch.Tensor, masks: list[torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """The residual stream entering each layer on the run of `ids` (`masks` held when gates are frozen):
    [L, b, p, d]."""
    resids: list[torch.Tensor] = []
    fns = {f"blocks.{layer}.hook_resid_pre": resids.append for layer in range(prepared.layout.n_layers)}
    with hook_points.hooks(prepared.module, fns), prepared.gates_of(masks):
        _unembed_last(prepared, ids)
    return torch.stack(resids)


@torch.no_grad()
def head_patched_metrics(prepared: PreparedModel, batch: PromptBatch, corrupted: Recording, heads: torch.Tensor,
                         masks: list[torch.Tensor] | None = None, max_tokens: int = 16384) -> torch.Tensor:
    """Per-prompt logit diff [K, b] of the clean batch with head heads[k] = (layer, head) alone patched from
    the corrupted recording: `patched_metric` with keep_heads False at that head only, many heads per forward.

    The heads of one layer patch copies of the batch stacked along the batch dimension, one head per copy, at
    most `max_tokens` tokens (copies x prompts x positions, at least one copy) per forward; the forward starts
    at that layer from the clean run's residual (a patch at layer l changes nothing below it). Frozen gates:
    every copy holds the clean run's masks; recomputed: every copy computes its own."""
    if heads.dim() != 2 or heads.shape[1] != 2:
        raise CircuitError(f"heads must be [K, 2] (layer, head) rows, got shape {tuple(heads.shape)}")
    b, p = batch.clean.shape
    resid = clean_residuals(prepared, batch.clean, masks)  # [L, b, p, d]
    metrics = torch.empty(len(heads), b)
    copies_per_forward = max(1, max_tokens // (b * p))
    for layer in heads[:, 0].unique().tolist():
        for rows in (heads[:, 0] == layer).nonzero().squeeze(1).split(copies_per_forward):
            metrics[rows] = _patched_from_layer(prepared, batch, layer, heads[rows, 1], resid[layer],
                                                corrupted.z[layer], masks)
    return metrics


def _patched_from_layer(prepared: PreparedModel, batch: PromptBatch, layer: int, heads: torch.Tensor,
                        resid: torch.Tensor, z_corrupted: torch.Tensor, masks: list[torch.Tensor] | None
                        ) -> torch.Tensor:
    """Per-prompt logit diff [K, b]: copy k of the batch with head (layer, heads[k]) patched, run from `layer`
    on with the clean residual resid [b, p, d] as its input; z_corrupted [b, p, H * dh] that layer's."""
    n_copies = len(heads)
    fns = {f"blocks.{layer}.hook_resid_pre": lambda _: resid.repeat(n_copies, 1, 1),
           f"blocks.{layer}.attn.hook_z": partial(patch_head_per_copy, z_corrupted=z_corrupted, heads=heads,
                                                  n_heads=prepared.layout.n_heads)}
    if masks is not None:  # layers below `layer` do not run
        masks = [mask if index < layer else mask.repeat(n_copies, 1, 1, 1) for index, mask in enumerate(masks)]
    with _layers_skipped(prepared.module, layer), hook_points.hooks(prepared.module, fns), prepared.gates_of(masks):
        logits = _unembed_last(prepared, batch.clean.repeat(n_copies, 1)).view(n_copies, len(batch.clean), -1)  # [K, b, vocab]
    return torch.stack([logit_diff(copy, batch) for copy in logits])
