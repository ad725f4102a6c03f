"""Where components sit in the edge matrices, and the pure tensor functions over them.

Nodes write into the residual stream: the token embedding, every head (its slice of o_proj), every
MLP. Edges run from a writer u to a later reader v: a head's input (split into its q, k and v inputs
by default, `split_qkv`), an MLP's input, or the logits (the final norm's input). A reader's input is
the sum of the writes before it, so an edge is one term of that sum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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


def patch_heads(z: torch.Tensor, z_corrupted: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Heads not kept take their corrupted output.  z, z_corrupted [b, p, H * dh]; keep bool [H]."""
    head_dim = z.shape[-1] // keep.shape[0]
    return torch.where(keep.repeat_interleave(head_dim), z, z_corrupted)


def removed_input(prefix_diff: torch.Tensor, diffs: torch.Tensor, kept: torch.Tensor) -> torch.Tensor | None:
    """What removed edges add to each reader's input: the sum over removed writers of (corrupted - actual),
    for K patched copies of a run at once.

    prefix_diff [K, n, d]: the sum over the U' writers the readers can read (n tokens); diffs [K, U, n, d]
    (U >= U', contiguous) every writer's difference; kept [K, U', C] bool, kept edges from the first U' writers
    into the C readers  ->  [K, C, n, d], or None when no edge is removed (every input unchanged).

    Sums whichever of the kept or the removed edges are fewer: prefix - (kept^T diffs) or (removed^T diffs),
    over the flattened (n d): a sparse matmul when they are few against the columns x rows that hold one,
    else one dense matmul per copy over those columns and (when few) rows; the other columns read the
    prefix (none kept) or nothing (none removed)."""
    n_copies, n_rows, n_cols = kept.shape
    n_kept = int(kept.sum())
    n_removed = kept.numel() - n_kept
    if n_removed == 0:
        return None
    from_kept = n_kept <= n_removed
    terms = kept if from_kept else ~kept  # [K, U', C]
    shape = (n_copies, n_cols, *prefix_diff.shape[1:])
    cols = terms.any(1).any(0).nonzero().squeeze(1)
    rows = terms[:, :, cols].any(2).any(0).nonzero().squeeze(1)
    source = diffs.flatten(2)  # [K, U, n * d]
    if 4 * min(n_kept, n_removed) < n_copies * len(cols) * len(rows):  # sparse: ~4x a dense product's cost per term
        copy, row, col = terms.nonzero().unbind(1)
        matrix = torch.sparse_coo_tensor(torch.stack([copy * n_cols + col, copy * diffs.shape[1] + row]),
                                         torch.ones(len(row), dtype=source.dtype, device=source.device),
                                         (n_copies * n_cols, n_copies * diffs.shape[1]), check_invariants=False)
        part = torch.sparse.mm(matrix, source.reshape(-1, source.shape[-1])).view(shape)
        return prefix_diff[:, None] - part if from_kept else part
    out = prefix_diff[:, None].expand(shape).clone() if from_kept else prefix_diff.new_zeros(shape)
    if len(cols) == 0:
        return out
    terms, source = terms[:, :, cols], source[:, :n_rows]  # [K, U', C'], [K, U', n * d]
    if (n_rows - len(rows)) * len(cols) > 4 * len(rows):  # a copy of the few rows costs less than their zeros
        terms, source = terms[:, rows], source[:, rows]
    part = torch.matmul(terms.transpose(1, 2).to(source.dtype), source).view(n_copies, len(cols), *shape[2:])
    if from_kept:
        out[:, cols] -= part.to(out.dtype)
    else:
        out[:, cols] = part.to(out.dtype)
    return out


def top_k_mask(scores: torch.Tensor, allowed: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k allowed entries with the largest |score| (ties: lower flat index first)."""
    return top_k_masks(scores, allowed)(k)


def top_k_masks(scores: torch.Tensor, allowed: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """k -> `top_k_mask(scores, allowed, k)`, the entries sorted once for every k (a curve asks for many)."""
    flat = scores.abs().flatten().masked_fill(~allowed.flatten(), -1.0)
    order = torch.sort(flat, descending=True, stable=True).indices

    def mask(k: int) -> torch.Tensor:
        kept = torch.zeros(flat.shape, dtype=torch.bool)
        kept[order[:k]] = True
        return kept.view(scores.shape) & allowed  # k beyond the allowed count must not pick disallowed entries

    return mask


# --------------------------------------------------------------------------------------------------
# Edges that carry signal


def column_rows(layout: ComponentLayout) -> torch.Tensor:
    """[V] the row of the component each column feeds (a head's q/k/v inputs -> that head, an MLP input ->
    that MLP); n_rows for the logits."""
    rows = torch.full((layout.n_cols,), layout.n_rows)
    for layer in range(layout.n_layers):
        cols = layout.head_cols(layer)
        rows[cols] = torch.arange(layout.head_row(layer, 0), layout.mlp_row(layer)).repeat_interleave(layout.n_inputs)
        rows[layout.mlp_col(layer)] = layout.mlp_row(layer)
    return rows


def causal_flows(n_positions: int) -> torch.Tensor:
    """[P, P] bool: flows[k, q] = a head's k/v input at position k can reach its output at q (k <= q)."""
    return torch.ones(n_positions, n_positions, dtype=torch.bool).triu()


def live_edges(kept: torch.Tensor, layout: ComponentLayout, flows: torch.Tensor | None = None,
               answer_position: int | torch.Tensor = -1) -> torch.Tensor:
    """The kept edges on a path from the inputs to the logits: writer reached from the embedding, reader's
    component reaching the logits, through kept edges only.  kept [U, V] or per position [U, V, P] -> same shape.

    Removing the others leaves the patched metric unchanged: a component none of whose inputs is reached
    reads only corrupted writes, so it writes its corrupted output, which is what a removed edge feeds; a
    component whose output reaches no kept edge to the logits cannot move them. Per position, a write at p
    is read at p; inside a head, its k / v inputs at k reach its output at q where flows[k, q] (default
    causal, k <= q), its q input only at q; the logits read `answer_position` only (one, or a tensor of
    several)."""
    by_position = kept.dim() == 3
    edges = kept if by_position else kept[:, :, None]  # [U, V, P]
    n_rows, n_cols, n_pos = edges.shape
    if flows is None:
        flows = causal_flows(n_pos) if by_position else torch.ones(1, 1, dtype=torch.bool)
    flow = flows.float()
    node_of = column_rows(layout)  # [V]
    is_query = torch.zeros(n_cols, dtype=torch.bool)  # a head's q input (with split_qkv): read at its own position
    for layer in range(layout.n_layers):
        cols = layout.head_cols(layer)
        is_query[cols] = (torch.arange(cols.stop - cols.start) % layout.n_inputs == 0) & layout.split_qkv
    is_mlp = torch.zeros(n_cols, dtype=torch.bool)
    is_mlp[[layout.mlp_col(layer) for layer in range(layout.n_layers)]] = True
    mixes = ~is_query & ~is_mlp  # k / v (or joint) head inputs: read across positions
    mixes[layout.logits_col] = False

    def to_output(col: int, fed: torch.Tensor) -> torch.Tensor:  # [P] input fed -> [P] component output reached
        return (fed.float() @ flow > 0) if mixes[col] else fed

    def from_output(col: int, alive: torch.Tensor) -> torch.Tensor:  # [P] output alive -> [P] input alive
        return (flow @ alive.float() > 0) if mixes[col] else alive

    reached = torch.zeros(n_rows + 1, n_pos, dtype=torch.bool)
    reached[0] = True  # the embedding
    for row in range(1, n_rows):
        for col in (node_of == row).nonzero().squeeze(1).tolist():
            fed = (edges[:row, col] & reached[:row]).any(0)  # [P]
            reached[row] |= to_output(col, fed)
    alive_col = torch.zeros(n_cols, n_pos, dtype=torch.bool)
    alive_col[layout.logits_col, answer_position] = True
    alive = torch.zeros(n_rows, n_pos, dtype=torch.bool)
    for row in range(n_rows - 1, -1, -1):
        alive[row] = (edges[row] & alive_col).any(0)
        for col in (node_of == row).nonzero().squeeze(1).tolist():
            alive_col[col] = from_output(col, alive[row])
    live = edges & reached[:n_rows, None, :] & alive_col[None, :, :]
    return live if by_position else live[:, :, 0]


def live_role_edges(kept: torch.Tensor, layout: ComponentLayout, role_sequences: list[torch.Tensor]) -> torch.Tensor:
    """The kept role edges on a path from the inputs to the logits in some prompt.  kept [U, V, R] bool,
    role_sequences: one prompt's token roles [p] (long, indices into R) each  ->  [U, V, R].

    Each prompt patches kept[:, :, roles[t]] at its token t; a role edge carries signal if one of its tokens'
    edges does in some prompt (`live_edges` by position, causal, the logits reading the last token). The
    distinct sequences are traced in one pass, laid end to end with attention flowing inside each only."""
    sequences = [torch.tensor(roles) for roles in dict.fromkeys(tuple(s.tolist()) for s in role_sequences)]
    index = torch.cat(sequences)  # [sum p]
    flows = torch.block_diag(*(causal_flows(len(s)) for s in sequences))
    last = torch.tensor([len(s) for s in sequences]).cumsum(0) - 1
    by_position = live_edges(kept[:, :, index], layout, flows, last)  # [U, V, sum p]
    return pool_by_role(by_position.float(), index, kept.shape[2]) > 0


def pool_by_role(by_position: torch.Tensor, roles: torch.Tensor, n_roles: int) -> torch.Tensor:
    """Sum per-position values into their tokens' roles.  by_position [U, V, p], roles [p] long -> [U, V, R]."""
    pooled = by_position.new_zeros(*by_position.shape[:2], n_roles)
    return pooled.index_add_(2, roles, by_position)
