"""Exact direct effects in the local replacement model by explicit backward linear propagation.

With attention patterns, gates and norm scales frozen and MLP outputs constant, the only paths from a
write (an MLP output at layer k, or a token embedding) to a readout (a feature's encoder at resid_mid
of layer l, or a logit direction at the final residual) run through the residual skip and the OV
circuits of the attention layers in between. So instead of autograd through the whole model, a
block of targets is swept down once: its gradient lives only on the layers below each target (rows
join the sweep at their own layer) and on the positions that can reach the targets' positions
through open attention weights (all earlier positions for dense attention, few for the sparse model).
At each layer the gradient at resid_post is dotted with every write into that layer's MLP output.
A CLT with a skip path adds one more linear path per layer: MLP-out[k] gets (g * resid_mid[k] / rms) @
W_skip[k] with the norm scale frozen, so the gradient at resid_post[k] also flows to resid_mid[k] through it
(at positions > 0: the MLP output at position 0 is a constant). All blocks in flight step down the layers
together, so each layer's decoder writes are gathered once per sweep, a chunk of positions at a time
(never all layers' writes at once: that cache would be n_active x d x (L + 1) / 2 floats).
"""

from __future__ import annotations

from collections.abc import Iterator
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


WRITES_CHUNK_ROWS = 16384  # decoder writes gathered together at most (16,384 x d floats: 36 MiB at d 576)


@dataclass(frozen=True)
class LayerWrites:
    """Which active features write into MLP-out of one layer (source layer <= it), sorted by position: those
    at position p are rows offsets[p]:offsets[p + 1]. The write vectors themselves are gathered from the
    CLT's decoder a chunk of positions at a time (`chunks`), never for the whole layer at once."""

    layer: int
    columns: torch.Tensor  # [n] long, source column (= active feature index)
    offsets: list[int]  # [P + 1]

    def chunks(self, lrm: LocalReplacementModel, max_rows: int = WRITES_CHUNK_ROWS
               ) -> Iterator[tuple[range, torch.Tensor]]:
        """(positions, writes [rows of those positions, d]) over consecutive positions, each chunk at most
        max_rows rows (or one position's)."""
        n_pos = len(self.offsets) - 1
        first = 0
        while first < n_pos:
            last = first + 1
            while last < n_pos and self.offsets[last + 1] - self.offsets[first] <= max_rows:
                last += 1
            start, end = self.offsets[first], self.offsets[last]
            if end > start:
                yield range(first, last), lrm.feature_writes(self.columns[start:end], self.layer)
            first = last


def layer_writes(lrm: LocalReplacementModel, layer: int) -> LayerWrites:
    """The active features that write into MLP-out `layer`, grouped by position."""
    index = (lrm.features[:, 0] <= layer).nonzero().flatten()
    index = index[torch.argsort(lrm.features[index, 1], stable=True)]
    counts = torch.bincount(lrm.features[index, 1], minlength=lrm.n_pos)
    offsets = [0, *torch.cumsum(counts, 0).tolist()]
    return LayerWrites(layer, index, offsets)


def attention_vjp(grad: torch.Tensor, pattern: torch.Tensor, W_O: torch.Tensor, W_V_gain: torch.Tensor,
                  key_inv_rms: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Gradient of a frozen-pattern attention layer's input, given the gradient at its output.

    grad [B, Q, d] at queries; pattern [H, Q, K]; W_O [d, H*dh]; W_V_gain [Kv*dh, d] (v_proj weight
    times the input norm's gain); key_inv_rms [K] -> [B, K, d] at keys (through the frozen norm).
    When most (head, query) rows of the pattern are empty (sparse attention), only the open heads
    and queries are multiplied through W_O.
    """
    open_rows = (pattern != 0).any(-1)  # [H, Q]
    if open_rows.float().mean() > SPARSE_HEAD_DENSITY:
        y = _value_grad_dense(grad, pattern, W_O, n_kv_heads)
    else:
        y = _value_grad_by_head(grad, pattern, W_O, n_kv_heads, open_rows)
    return (y * key_inv_rms[:, None, None]).flatten(2) @ W_V_gain


SPARSE_HEAD_DENSITY = 0.5  # above this share of open (head, query) rows, one dense matmul is faster


def _value_grad_dense(grad: torch.Tensor, pattern: torch.Tensor, W_O: torch.Tensor, n_kv_heads: int
                      ) -> torch.Tensor:
    """d readout / d values.  grad [B, Q, d], pattern [H, Q, K] -> [B, K, Kv, dh]"""
    batch, n_query, _ = grad.shape
    n_heads, _, n_key = pattern.shape
    z = (grad @ W_O).view(batch, n_query, n_heads, -1)  # [B, Q, H, dh]
    y = torch.einsum("hqk,bqhe->bkhe", pattern, z)  # [B, K, H, dh]
    return y.reshape(batch, n_key, n_kv_heads, n_heads // n_kv_heads, -1).sum(3)


def _value_grad_by_head(grad: torch.Tensor, pattern: torch.Tensor, W_O: torch.Tensor, n_kv_heads: int,
                        open_rows: torch.Tensor) -> torch.Tensor:
    """As _value_grad_dense, one head at a time over its open queries and keys only."""
    batch = grad.shape[0]
    n_heads, _, n_key = pattern.shape
    head_dim = W_O.shape[1] // n_heads
    group = n_heads // n_kv_heads
    y = grad.new_zeros(batch, n_key, n_kv_heads, head_dim)
    for head in open_rows.any(1).nonzero().flatten().tolist():
        queries = open_rows[head].nonzero().flatten()
        keys = (pattern[head, queries] != 0).any(0).nonzero().flatten()
        z = grad[:, queries] @ W_O[:, head * head_dim:(head + 1) * head_dim]  # [B, q, dh]
        mixed = torch.einsum("qk,bqe->bke", pattern[head][queries][:, keys], z)  # [B, k, dh]
        y[:, keys, head // group] += mixed
    return y


def skip_forward(resid_mid: torch.Tensor, W_skip: torch.Tensor, gain: torch.Tensor, scale: torch.Tensor
                 ) -> torch.Tensor:
    """What one layer's skip path writes into its MLP output, given (an effect on) resid_mid.
    resid_mid [..., P, d], W_skip [d_in, d_out], gain [d], scale [P] frozen 1 / rms (0 where no path) -> [..., P, d]"""
    return (resid_mid * (scale[:, None] * gain)) @ W_skip


def skip_vjp(grad: torch.Tensor, W_skip: torch.Tensor, gain: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gradient at resid_mid through one layer's skip path, given the gradient at its MLP output (the transpose
    of `skip_forward`).  grad [..., P, d], W_skip [d_in, d_out], gain [d], scale [P] -> [..., P, d]"""
    return (grad @ W_skip.T) * (scale[:, None] * gain)


def attended_keys(pattern: torch.Tensor, queries: torch.Tensor | slice) -> torch.Tensor:
    """Sorted positions with a nonzero attention weight from any of `queries` in any head.  pattern [H, P, P]"""
    return (pattern[:, queries] != 0).any(0).any(0).nonzero().flatten()


def as_index(positions: torch.Tensor) -> slice | torch.Tensor:
    """A slice when the sorted positions are a contiguous range (indexing then makes no copy)."""
    if len(positions) and int(positions[-1] - positions[0]) + 1 == len(positions):
        return slice(int(positions[0]), int(positions[-1]) + 1)
    return positions


class BlockSweep:
    """The downward sweep of one block of targets: its gradient d readout / d residual, [B, P', d],
    read and written only on `support` (the positions it can be nonzero on). Rows are sorted by
    layer, descending, so the rows already injected are a prefix of length n_alive."""

    def __init__(self, lrm: LocalReplacementModel, targets: TargetSet):
        self.lrm = lrm
        self.order = torch.argsort(targets.layer, descending=True, stable=True)
        self.layer, self.pos = targets.layer[self.order], targets.pos[self.order]
        self.readout = targets.readout[self.order]
        self.out = torch.zeros(n_source_columns(lrm), len(self.order))  # source-major
        self.constant = torch.zeros(len(self.order))
        self.support = torch.unique(self.pos)
        self.grad = torch.zeros(len(self.order), int(self.support[-1]) + 1, lrm.model.d_model)
        self.n_alive = 0

    def inject(self, level: int) -> None:
        """Add the readouts of targets that read the residual at `level` (n_layers: the final one)."""
        new = torch.arange(self.n_alive, self.n_alive + int((self.layer == level).sum()))
        self.grad[new, self.pos[new]] += self.readout[new]
        self.n_alive += len(new)

    def read_feature_writes(self, positions: range, writes: torch.Tensor, columns: torch.Tensor,
                            offsets: list[int]) -> None:
        """Dot the gradient at resid_post with the feature writes of one chunk of positions: writes [n, d] are
        the rows offsets[positions[0]]:offsets[positions[-1] + 1] of the layer's LayerWrites, columns theirs."""
        if not self.n_alive:
            return
        n, base = self.n_alive, offsets[positions.start]
        out = self.out[:, :n]
        support = self.support
        inside = support[(support >= positions.start) & (support < positions.stop)]
        for p in inside.tolist():
            start, end = offsets[p] - base, offsets[p + 1] - base
            if end > start:
                out.index_add_(0, columns[start:end], writes[start:end] @ self.grad[:n, p].T)

    def read_other_writes(self, k: int) -> None:
        """Dot the gradient at resid_post[k] with the error nodes and constants of MLP-out k."""
        if not self.n_alive:
            return
        lrm, n, support = self.lrm, self.n_alive, self.support
        at = as_index(support)
        g = self.grad[:n, at].transpose(0, 1)  # [S, n, d]
        per_pos = torch.stack([lrm.errors[k, at], lrm.constants[k, at]], -1)  # [S, d, 2]
        errors_and_constants = torch.bmm(g, per_pos)  # [S, n, 2]
        self.out[:, :n].index_add_(0, lrm.n_active + k * lrm.n_pos + support, errors_and_constants[..., 0])
        self.constant[:n] += errors_and_constants[..., 1].sum(0)

    def through_skip(self, k: int) -> None:
        """Add the path from resid_mid[k] through the CLT's skip into MLP-out k (no-op without a skip path)."""
        if not self.n_alive or not self.lrm.has_skip:
            return
        lrm, n, at = self.lrm, self.n_alive, as_index(self.support)
        self.grad[:n, at] += skip_vjp(self.grad[:n, at], lrm.clt.W_skip[k], lrm.model.mlp_norm[k],
                                      lrm.skip_input_scale(k)[at])

    def through_attention(self, k: int) -> None:
        """Move the gradient from resid_mid[k] to resid_pre[k] (skip + frozen attention), after dotting it
        with the attention's constant write (value and output-projection biases) where there is one."""
        if not self.n_alive:
            return
        weights, frozen, n = self.lrm.model, self.lrm.prompt, self.n_alive
        at = as_index(self.support)
        if self.lrm.attn_constants is not None:
            self.constant[:n] += torch.einsum("npd,pd->n", self.grad[:n, at], self.lrm.attn_constants[k, at])
        keys = attended_keys(frozen.patterns[k], at)
        if not len(keys):
            return
        key_at = as_index(keys)
        through = attention_vjp(
            self.grad[:n, at], frozen.patterns[k][:, at][:, :, key_at], weights.W_O[k],
            weights.W_V[k] * weights.attn_norm[k], frozen.attn_inv_rms[k, keys], weights.n_kv_heads,
        )  # [n, K, d]
        if isinstance(key_at, slice):
            self.grad[:n, key_at] += through
        else:
            self.grad[:n].index_add_(1, keys, through)
        self.support = torch.unique(torch.cat([self.support, keys]))

    def read_tokens(self) -> None:
        """Dot the gradient at the embeddings with the token embeddings (and learned position embeddings,
        constants, where the family has them)."""
        lrm, n, support = self.lrm, self.n_alive, self.support
        embeddings = lrm.model.embed[lrm.prompt.tokens[support]]  # [S, d]
        tokens = torch.bmm(self.grad[:n, as_index(support)].transpose(0, 1), embeddings.unsqueeze(-1))
        self.out[:, :n].index_add_(0, lrm.n_active + lrm.n_layers * lrm.n_pos + support, tokens.squeeze(-1))
        if lrm.model.pos_embed is not None:
            self.constant[:n] += torch.einsum("npd,pd->n", self.grad[:n, as_index(support)],
                                              lrm.model.pos_embed[support])

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [T, n_columns], constant [T]) in the order the targets were given."""
        unsorted = torch.empty_like(self.order)
        unsorted[self.order] = torch.arange(len(self.order))
        return self.out[:, unsorted].T, self.constant[unsorted]


def sweep(lrm: LocalReplacementModel, blocks: list[TargetSet]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Direct effects of every source on each block of targets, all blocks stepping down together.

    Per block: (rows [T, n_columns], constant [T]); rows[t, c] is the edge from source column c into
    target t, constant[t] the effect of everything that is no node (b_dec, the BOS-position MLP).
    Each layer's decoder writes are gathered once for all blocks, a chunk of positions at a time.
    """
    states = [BlockSweep(lrm, block) for block in blocks]
    for state in states:
        state.inject(lrm.n_layers)
    for k in reversed(range(lrm.n_layers)):
        alive = [state for state in states if state.n_alive]
        if alive:
            writes = layer_writes(lrm, k)
            for positions, chunk in writes.chunks(lrm):
                first, last = writes.offsets[positions.start], writes.offsets[positions.stop]
                for state in alive:
                    state.read_feature_writes(positions, chunk, writes.columns[first:last], writes.offsets)
        for state in states:
            state.read_other_writes(k)
            state.through_skip(k)
            state.inject(k)
            state.through_attention(k)
    for state in states:
        state.read_tokens()
    return [state.result() for state in states]


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


def attribution_rows(lrm: LocalReplacementModel, targets: TargetSet, *, min_block_rows: int = 32,
                     max_block_rows: int = 512, max_grad_bytes: int = 2**30) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the adjacency matrix for `targets` (all source columns), and their constant parts.

    Blocks are swept together as long as their gradients fit in `max_grad_bytes`.
    -> (rows [T, n_active + (L + 1) * P], constant [T])
    """
    rows = torch.zeros(len(targets), n_source_columns(lrm))
    constant = torch.zeros(len(targets))
    blocks = position_blocks(targets.pos, min_block_rows, max_block_rows) if len(targets) else []
    row_bytes = lrm.n_pos * lrm.model.d_model * 4
    group: list[torch.Tensor] = []
    for i, block in enumerate(blocks):
        group.append(block)
        if i + 1 == len(blocks) or sum(map(len, group)) + len(blocks[i + 1]) > max_grad_bytes // row_bytes:
            swept = sweep(lrm, [targets.subset(b) for b in group])
            for index, (block_rows, block_constant) in zip(group, swept):
                rows[index], constant[index] = block_rows, block_constant
            group = []
    return rows, constant
