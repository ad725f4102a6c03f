"""Exact direct effects in the local replacement model by explicit backward linear propagation.

With attention patterns, gates and norm scales frozen and MLP outputs constant, the only paths from a
write (an MLP output at layer k, or a token embedding) to a readout (a feature's encoder at resid_mid
of layer l, or a logit direction at the final residual) run through the residual skip and the OV
circuits of the attention layers in between. So instead of autograd through the whole model, a
block of targets is swept down once: its gradient lives only on the layers below each target (rows
join the sweep at their own layer) and on the positions that can reach the targets' positions
through open attention weights (all earlier positions for dense attention, few for the sparse model).
At each layer the gradient at resid_post is dotted with every write into that layer's MLP output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.nodes import LocalReplacementModel


@dataclass(frozen=True)
class TargetSet:
    """Readout directions in the residual stream.  `layer` n_layers means the final residual (logits)."""

    layer: torch.Tensor  # [T] long: read from resid_mid[layer], or the final residual if == n_layers
    pos: torch.Tensor  # [T] long
    readout: torch.Tensor  # [T, d] frozen norm scale and gain folded in

    def __len__(self) -> int:
        return len(self.layer)

    def subset(self, index: torch.Tensor) -> TargetSet:
        return TargetSet(self.layer[index], self.pos[index], self.readout[index])


def feature_targets(lrm: LocalReplacementModel, index: torch.Tensor) -> TargetSet:
    """Targets for active features `index`: their pre-activation readouts."""
    return TargetSet(lrm.features[index, 0], lrm.features[index, 1], lrm.feature_readouts(index))


def logit_targets(lrm: LocalReplacementModel) -> TargetSet:
    """Targets for the logit nodes: demeaned unembedding rows at the last position."""
    n = len(lrm.logit_tokens)
    return TargetSet(torch.full((n,), lrm.n_layers), torch.full((n,), lrm.n_pos - 1), lrm.logit_readouts())


def n_source_columns(lrm: LocalReplacementModel) -> int:
    """Columns of a row: every active feature, then error nodes (layer-major), then tokens."""
    return lrm.n_active + (lrm.n_layers + 1) * lrm.n_pos


@dataclass(frozen=True)
class DecoderWrites:
    """Per layer k, the writes into MLP-out k of all active features with source layer <= k, padded by
    position so one batched matmul per layer dots them with a gradient over positions."""

    writes: list[torch.Tensor]  # per layer [P, slots, d]
    columns: list[torch.Tensor]  # per layer [P, slots] long: source column, or n_columns for padding


def decoder_writes(lrm: LocalReplacementModel) -> DecoderWrites:
    n_pos, d_model, pad_column = lrm.n_pos, lrm.model.d_model, n_source_columns(lrm)
    writes, columns = [], []
    for layer in range(lrm.n_layers):
        index = (lrm.features[:, 0] <= layer).nonzero().flatten()
        pos = lrm.features[index, 1]
        order = torch.argsort(pos, stable=True)
        index, pos = index[order], pos[order]
        counts = torch.bincount(pos, minlength=n_pos)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(index)) - starts[pos]
        slots = int(counts.max()) if len(index) else 0
        layer_writes = torch.zeros(n_pos, slots, d_model)
        layer_columns = torch.full((n_pos, slots), pad_column)
        layer_writes[pos, slot] = lrm.feature_writes(index, layer)
        layer_columns[pos, slot] = index
        writes.append(layer_writes)
        columns.append(layer_columns)
    return DecoderWrites(writes, columns)


def attention_vjp(grad: torch.Tensor, pattern: torch.Tensor, W_O: torch.Tensor, W_V_gain: torch.Tensor,
                  key_inv_rms: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Gradient of a frozen-pattern attention layer's input, given the gradient at its output.

    grad [B, Q, d] at queries; pattern [H, Q, K]; W_O [d, H*dh]; W_V_gain [Kv*dh, d] (v_proj weight
    times the input norm's gain); key_inv_rms [K] -> [B, K, d] at keys (through the frozen norm).
    """
    batch, n_query, _ = grad.shape
    n_heads, _, n_key = pattern.shape
    z = (grad @ W_O).view(batch, n_query, n_heads, -1)  # [B, Q, H, dh]
    y = torch.einsum("hqk,bqhe->bkhe", pattern, z)  # [B, K, H, dh]
    y = y.reshape(batch, n_key, n_kv_heads, n_heads // n_kv_heads, -1).sum(3)  # [B, K, Kv, dh]
    return (y * key_inv_rms[:, None, None]).flatten(2) @ W_V_gain


def reachable_keys(pattern: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Positions with a nonzero attention weight from any of `queries` in any head, plus the queries.
    pattern [H, P, P]; queries [Q] sorted -> sorted positions."""
    keys = (pattern[:, queries] != 0).any(0).any(0).nonzero().flatten()
    return torch.unique(torch.cat([queries, keys]))


def as_index(positions: torch.Tensor) -> slice | torch.Tensor:
    """A slice when the sorted positions are a contiguous range (indexing then makes no copy)."""
    if len(positions) and int(positions[-1] - positions[0]) + 1 == len(positions):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


def sweep(lrm: LocalReplacementModel, targets: TargetSet, dec: DecoderWrites
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct effects of every source on a block of targets, in one downward sweep.

    Returns (rows [T, n_columns], constant [T]): rows[t, c] is the edge from source column c to
    target t; constant[t] the effect of all non-node constants (decoder biases, BOS-position MLP).
    The gradient [B, S, d] lives on the `support` positions it can be nonzero on; rows are sorted by
    layer, descending, so the rows already injected are a prefix.
    """
    n_layers, n_pos, n_active = lrm.n_layers, lrm.n_pos, lrm.n_active
    weights, frozen = lrm.model, lrm.prompt
    n_columns = n_source_columns(lrm)
    order = torch.argsort(targets.layer, descending=True, stable=True)
    layer, pos, readout = targets.layer[order], targets.pos[order], targets.readout[order]
    n_rows = len(order)
    out = torch.zeros(n_columns + 1, n_rows)  # source-major; the last row absorbs padding
    constant = torch.zeros(n_rows)
    support = torch.unique(pos)
    grad = torch.zeros(n_rows, len(support), weights.d_model)  # [B, S, d]
    n_alive = 0

    def inject(level: int) -> int:
        new = int((layer == level).sum())
        rows = torch.arange(n_alive, n_alive + new)
        grad[rows, torch.searchsorted(support, pos[rows])] += readout[rows]
        return n_alive + new

    n_alive = inject(n_layers)
    for k in reversed(range(n_layers)):
        at = as_index(support)
        if n_alive:  # dot d readout / d resid_post[k] with every write into MLP-out k
            g = grad[:n_alive].transpose(0, 1)  # [S, n, d]
            slots = dec.writes[k][at]  # [S, m, d]
            if slots.shape[1]:
                values = torch.bmm(slots, g.transpose(1, 2))  # [S, m, n]
                out[:, :n_alive].index_add_(0, dec.columns[k][at].flatten(), values.flatten(0, 1))
            per_pos = torch.stack([lrm.errors[k, at], lrm.constants[k, at]], -1)  # [S, d, 2]
            errors_and_constants = torch.bmm(g, per_pos)  # [S, n, 2]
            out[:, :n_alive].index_add_(0, n_active + k * n_pos + support, errors_and_constants[..., 0])
            constant[:n_alive] += errors_and_constants[..., 1].sum(0)
        n_alive = inject(k)
        if not n_alive:
            continue
        keys = reachable_keys(frozen.patterns[k], support)
        through_attention = attention_vjp(
            grad[:n_alive], frozen.patterns[k][:, at][:, :, as_index(keys)], weights.W_O[k],
            weights.W_V[k] * weights.attn_norm[k], frozen.attn_inv_rms[k, keys], weights.n_kv_heads,
        )  # [n, K, d]
        if len(keys) != len(support):
            widened = torch.zeros(n_rows, len(keys), weights.d_model)
            widened[:, torch.searchsorted(keys, support)] = grad
            grad, support = widened, keys
        grad[:n_alive] += through_attention
    embeddings = weights.embed[frozen.tokens[support]]  # [S, d]
    tokens = torch.bmm(grad[:n_alive].transpose(0, 1), embeddings.unsqueeze(-1)).squeeze(-1)  # [S, n]
    out[:, :n_alive].index_add_(0, n_active + n_layers * n_pos + support, tokens)
    unsorted = torch.empty_like(order)
    unsorted[order] = torch.arange(n_rows)
    return out[:n_columns, unsorted].T, constant[unsorted]


def position_blocks(pos: torch.Tensor, min_rows: int, max_rows: int) -> list[torch.Tensor]:
    """Split target indices into blocks of nearby positions: positions are merged in order until a
    block has `min_rows` rows, and no block has more than `max_rows`."""
    order = torch.argsort(pos, stable=True)
    counts = torch.bincount(pos[order]).tolist()
    blocks, start, size = [], 0, 0
    for count in counts:
        size += count
        if size >= min_rows:
            blocks.append(order[start:start + size])
            start, size = start + size, 0
    if size:
        blocks.append(order[start:start + size])
    return [chunk for block in blocks for chunk in block.split(max_rows)]


def attribution_rows(lrm: LocalReplacementModel, targets: TargetSet, dec: DecoderWrites | None = None,
                     *, min_block_rows: int = 32, max_block_rows: int = 512
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the adjacency matrix for `targets` (all source columns), and their constant parts.

    -> (rows [T, n_active + (L + 1) * P], constant [T])
    """
    dec = dec if dec is not None else decoder_writes(lrm)
    rows = torch.zeros(len(targets), n_source_columns(lrm))
    constant = torch.zeros(len(targets))
    if len(targets):
        for block in position_blocks(targets.pos, min_block_rows, max_block_rows):
            rows[block], constant[block] = sweep(lrm, targets.subset(block), dec)
    return rows, constant
