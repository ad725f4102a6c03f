"""Head loadings: every kept edge split exactly into one part per attention head, per layer.

Every linear path from a source's write to a target's readout either passes through the attention of
layer j - through exactly one head h - or skips it through the residual. So for each layer j between
the two nodes, edge = sum_h part[j, h] + skip[j], with

    part[j, h] = sum_q z_j[t, q, h] . u_j[s, q, h]

where z_j[t] = W_O^h^T (d target / d resid_mid[j]) (target side, from a backward sweep) and
u_j[s, q, h] = sum_k pattern[j, h, q, k] v_j[s, k, h] is head h's output, before W_O, caused by the
source's whole effect on resid_pre[j] (source side, from a forward sweep). skip[j] = edge - sum_h part.
For the heads stored, the (query, key) pair carrying most of the part is named too. A CLT skip path is one
more linear path inside each MLP: both sweeps run through it (z_j is the whole gradient, u_j the whole
effect), so the parts stay exact and the paths through skips are split over heads like any other.

Memory is bounded by chunks (`HeadChunks`, planned from a byte budget by `plan_head_chunks`): a chunk
of targets holds its z for every layer it needs; the sources of its edges are swept forward a chunk at a
time, on positions from the chunk's first source to the targets' last (causal attention: nothing else
reaches the targets); per layer the parts of all (target, source) pairs of the two chunks are one
matmul per head, or per-edge dot products when few pairs are edges; the (query, key) grid of a stored
head is searched only between its edge's source and target positions, a bounded number of bytes at a time,
and when wide row by row under Cauchy-Schwarz bounds (`_bounded_pairs`: the same pair and share as forming
every cell). The numbers do not depend on the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from attribution.budget import FLOAT_BYTES, MemoryBudgetError, default_budget_bytes
from attribution.config import AttentionAttributionConfig
from attribution.graph import AttributionGraph
from attribution.nodes import LocalReplacementModel
from attribution.propagate import (
    TargetSet,
    attention_vjp,
    feature_targets,
    logit_targets,
    position_blocks,
    skip_forward,
    skip_vjp,
)
from attribution.prune import find_threshold

SKIP_HEAD = -1  # the part of an edge that skips the layer's attention
OTHER_HEADS = -2  # the parts of the heads below head_min_share, summed

LOADING_COLUMNS = ["target", "source", "layer", "head", "weight", "query_pos", "key_pos", "pair_share"]
LOADING_DTYPES = {"target": "int32", "source": "int32", "layer": "int32", "head": "int32", "weight": "float32",
                  "query_pos": "int32", "key_pos": "int32", "pair_share": "float32"}

MIN_SOURCE_ROWS = 32  # sources of nearby positions swept together at least (each block from its first position)
MAX_PAIR_CHUNK = 4096  # (edge, head) entries whose (query, key) grids are formed together at most
FULL_WIDTH = 32  # (query, key) windows up to this width are formed whole; wider ones searched under a bound
BOUNDED_MAX_HEAD_DIM = 16  # the bounded search only for heads this narrow (measured: head_dim 8 4.0x faster at
# 769 tokens; SmolLM2's 64: 0.73x at 64 tokens, 0.82x at 256, its Cauchy-Schwarz bounds rarely settle a grid)
FIRST_ROWS = 16  # rows of a wide window formed first (per bound; then four times as many, until the bound settles it)
KEY_BLOCK = 16  # keys per block of the blocked bound
BOUND_MARGIN = 1e-3  # relative: float32 rounding of a dh-term dot product is below dh * 2^-24 of the bound
BOUND_SLACK = 2.0**-100  # absolute: float32 underflow in the products
OPEN_CELL_COST = 8  # a cell formed alone (gathers, a dh-term dot product) costs about this many cells of a bmm
OPEN_CELL_BYTES = 96  # per open cell besides its z and value rows: indices (int64) and products


@dataclass(frozen=True)
class HeadChunks:
    """How much of the head-loading computation is held at once."""

    targets: int  # targets whose head-side gradients (every layer) are held together
    sources: int  # sources swept forward together
    pairs: int  # (edge, head) entries whose (query, key) grids are formed together


@dataclass(frozen=True)
class LoadingShape:
    """The sizes that set the memory of head loadings."""

    n_pos: int
    d_model: int
    n_layers: int
    n_heads: int


def chunk_bytes(chunks: HeadChunks, shape: LoadingShape) -> int:
    """Peak bytes of the head loadings with `chunks` (an upper bound: every position, every layer)."""
    row = shape.n_pos * shape.d_model * FLOAT_BYTES  # one residual-sized [P, d] tensor
    targets = chunks.targets * row * (shape.n_layers + 4)  # z per layer, the gradient, attention_vjp's temporaries
    sources = chunks.sources * row * 7  # residual effect, normed input, values, heads' outputs, W_O product
    # per-head layouts of both sides, or edge slices (later: row-major copies of z and values for open cells)
    contraction = (2 * (chunks.targets + chunks.sources) * row
                   + chunks.targets * chunks.sources * shape.n_heads * FLOAT_BYTES)  # every (target, source) part
    pairs = chunks.pairs * (3 * shape.n_pos + 2 * shape.d_model) * shape.n_pos * FLOAT_BYTES  # grids, z and values
    peaks = (shape.n_heads + 3) * shape.n_pos**2 * FLOAT_BYTES  # a layer's pattern peaks (GridBounds), cummax's temporaries
    # a layer's open cells (OpenCells, at most 1/OPEN_CELL_COST of the causal cells): nonzero()'s int64 triples,
    # weights and row keys, 36 bytes a cell
    cells = 36 * shape.n_heads * shape.n_pos * (shape.n_pos + 1) // (2 * OPEN_CELL_COST)
    return targets + sources + contraction + pairs + peaks + cells


def plan_head_chunks(shape: LoadingShape, n_targets: int, n_sources: int, budget_bytes: int) -> HeadChunks:
    """The largest chunks that fit `budget_bytes`: targets first, in up to half of it (every target chunk
    sweeps its sources again), then sources, up to three quarters, then (query, key) grids in the rest.
    Raises MemoryBudgetError if even one of each does not fit."""
    needed = chunk_bytes(HeadChunks(1, 1, 1), shape)
    if needed > budget_bytes:
        raise MemoryBudgetError(
            f"head loadings of a {shape.n_pos}-position prompt need at least {needed / 2**30:.2f} GiB, over the "
            f"memory budget of {budget_bytes / 2**30:.2f} GiB; raise memory_budget_gb or shorten the prompt"
        )

    def largest(limit: int, fits) -> int:
        """The largest n in [1, limit] with fits(n), given fits(1)."""
        low, high = 1, max(1, limit)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(mid) else (low, mid - 1)
        return low

    targets = largest(n_targets, lambda n: chunk_bytes(HeadChunks(n, 1, 1), shape) <= budget_bytes // 2)
    sources = largest(n_sources, lambda n: chunk_bytes(HeadChunks(targets, n, 1), shape) <= budget_bytes * 3 // 4)
    pairs = largest(MAX_PAIR_CHUNK, lambda n: chunk_bytes(HeadChunks(targets, sources, n), shape) <= budget_bytes)
    return HeadChunks(targets, sources, pairs)


def node_layers(graph: AttributionGraph) -> tuple[torch.Tensor, torch.Tensor]:
    """Per graph node: the first layer it writes into (-1: the embedding, before layer 0; logits
    n_layers) and the layer whose resid_mid it reads (n_layers: the final residual; errors and tokens
    -1).  -> (write [N], read [N]) long"""
    n_sel, n_pos, n_layers = graph.n_selected, graph.n_pos, graph.n_layers
    feature_layer = graph.active_features[graph.selected, 0]
    n_logits = graph.n_nodes - graph.logit_start
    write = torch.cat([feature_layer, torch.arange(n_layers).repeat_interleave(n_pos),
                       torch.full((n_pos,), -1), torch.full((n_logits,), n_layers)])
    read = torch.cat([feature_layer, torch.full((n_layers * n_pos + n_pos,), -1), torch.full((n_logits,), n_layers)])
    assert len(write) == len(read) == n_sel + (n_layers + 1) * n_pos + n_logits
    return write, read


def node_positions(graph: AttributionGraph) -> torch.Tensor:
    """Per graph node: its position.  -> [N] long"""
    return graph.node_table()["pos"]


def graph_targets(lrm: LocalReplacementModel, graph: AttributionGraph, nodes: torch.Tensor) -> TargetSet:
    """Readouts of graph nodes `nodes` (features or logits, graph node indices), in their order."""
    is_logit = nodes >= graph.logit_start
    features = feature_targets(lrm, graph.selected[nodes[~is_logit]])
    logits = logit_targets(lrm).subset(nodes[is_logit] - graph.logit_start)
    order = torch.argsort(torch.cat([(~is_logit).nonzero().flatten(), is_logit.nonzero().flatten()]))
    return TargetSet(torch.cat([features.layer, logits.layer])[order], torch.cat([features.pos, logits.pos])[order],
                     torch.cat([features.readout, logits.readout])[order])


def head_side_gradients(lrm: LocalReplacementModel, targets: TargetSet, n_pos: int, keep: range
                        ) -> dict[int, torch.Tensor]:
    """z_j = (d readout / d resid_mid[j]) @ W_O[j] for the layers j in `keep`, on positions [0, n_pos)
    (all targets must lie there), head-major. Targets sorted by layer, descending (the rows alive at a
    layer are a prefix).  -> {j: [H, T, n_pos, dh]}"""
    weights, frozen = lrm.model, lrm.prompt
    if bool((targets.layer[1:] > targets.layer[:-1]).any()):
        raise ValueError("head_side_gradients needs targets sorted by layer, descending")
    grad = torch.zeros(len(targets), n_pos, weights.d_model)
    z = {}
    n_alive = 0
    for level in reversed(range(keep.start, lrm.n_layers + 1)):
        if level < lrm.n_layers and lrm.has_skip and n_alive:  # resid_post[level] -> resid_mid[level] via the skip
            grad[:n_alive] += skip_vjp(grad[:n_alive], lrm.clt.W_skip[level], weights.mlp_norm[level],
                                       lrm.skip_input_scale(level)[:n_pos])
        new = torch.arange(n_alive, n_alive + int((targets.layer == level).sum()))
        grad[new, targets.pos[new]] += targets.readout[new]
        n_alive += len(new)
        if level == lrm.n_layers:
            continue
        if level in keep:
            z[level] = torch.zeros(weights.n_heads, len(targets), n_pos, weights.head_dim)
            through = (grad[:n_alive] @ weights.W_O[level]).unflatten(-1, (weights.n_heads, -1))  # [n, P, H, dh]
            z[level][:, :n_alive] = through.permute(2, 0, 1, 3)
        if level > keep.start and n_alive:
            grad[:n_alive] += attention_vjp(grad[:n_alive], frozen.patterns[level][:, :n_pos, :n_pos],
                                            weights.W_O[level], weights.W_V[level] * weights.attn_norm[level],
                                            frozen.attn_inv_rms[level, :n_pos], weights.n_kv_heads)
    return z


class SourceWrites:
    """What source nodes write, layer by layer, added into a residual effect [S, P', d] on positions
    [start, start + P') as a forward sweep passes: tokens before layer 0, features into MLP-outs l_s..,
    errors into their layer."""

    def __init__(self, lrm: LocalReplacementModel, graph: AttributionGraph, sources: torch.Tensor, start: int = 0):
        self.lrm, self.start = lrm, start
        rows = torch.arange(len(sources))
        is_feature, is_token = sources < graph.error_start, sources >= graph.token_start
        is_error = ~is_feature & ~is_token
        feats = graph.active_features[graph.selected[sources[is_feature]]]  # [n, 3]
        self.feature_rows, self.feature_layer, self.feature_pos, self.feature_id = rows[is_feature], *feats.unbind(1)
        self.feature_act = graph.activations[graph.selected[sources[is_feature]]]
        error = sources[is_error] - graph.error_start
        self.error_rows, self.error_layer, self.error_pos = rows[is_error], error // graph.n_pos, error % graph.n_pos
        self.token_rows, self.token_pos = rows[is_token], sources[is_token] - graph.token_start
        self.token_ids = graph.tokens[self.token_pos]

    def embedded(self, n_sources: int, n_pos: int) -> torch.Tensor:
        """The residual effect entering layer 0.  -> [S, n_pos, d]"""
        lrm = self.lrm
        resid = torch.zeros(n_sources, n_pos, lrm.model.d_model)
        resid[self.token_rows, self.token_pos - self.start] = lrm.model.embed[self.token_ids]
        return resid

    def add_mlp_writes(self, resid: torch.Tensor, layer: int) -> None:
        """Add what the sources write into MLP-out `layer` (in place)."""
        live = self.feature_layer <= layer
        for source_layer in self.feature_layer[live].unique().tolist():
            mask = self.feature_layer == source_layer
            vectors = self.lrm.clt.W_dec[source_layer][self.feature_id[mask], layer - source_layer]
            resid[self.feature_rows[mask], self.feature_pos[mask] - self.start] += vectors * self.feature_act[mask, None]
        here = self.error_layer == layer
        resid[self.error_rows[here], self.error_pos[here] - self.start] += self.lrm.errors[layer, self.error_pos[here]]


def head_outputs(lrm: LocalReplacementModel, layer: int, resid: torch.Tensor, start: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen attention of `layer` applied to residual effects [S, P', d] on positions [start, start + P')
    (zero before start), head-major: (values [Kv, S, P', dh], per-head outputs before W_O [H, S, P', dh])."""
    weights, frozen = lrm.model, lrm.prompt
    n_kv = weights.n_kv_heads
    window = slice(start, start + resid.shape[1])
    normed = resid * frozen.attn_inv_rms[layer, window][:, None] * weights.attn_norm[layer]
    values = (normed @ weights.W_V[layer].T).unflatten(-1, (n_kv, -1)).permute(2, 0, 1, 3)  # [Kv, S, P', dh]
    pattern = frozen.patterns[layer][:, window, window].unflatten(0, (n_kv, -1))  # [Kv, G, P', P']
    mixed = torch.einsum("cgqk,cske->cgsqe", pattern, values)  # [Kv, G, S, P', dh]
    return values, mixed.flatten(0, 1)


def head_loadings(lrm: LocalReplacementModel, graph: AttributionGraph, targets: torch.Tensor,
                  sources: torch.Tensor, config: AttentionAttributionConfig, chunks: HeadChunks | None = None,
                  memory_budget: int | None = None) -> pd.DataFrame:
    """Head loadings of the edges (targets[i] <- sources[i]) (graph node indices), one row per stored
    part: per carrying layer, the heads holding >= head_min_share of |edge| (with their main (query,
    key) pair), the rest of the heads (head -2) and the skip part (head -1). Edges that cross no
    attention layer have no rows (`edges_to_load` picks the edges the stage loads).

    `chunks` fixes how much is held at once; else they are planned to fit `memory_budget` bytes (None:
    the machine's default budget), and MemoryBudgetError is raised if nothing fits."""
    write, read = node_layers(graph)
    weight = graph.edge_weights(targets, sources)
    keep = crossing_attention(graph, targets, sources) & (weight != 0)
    targets, sources, weight = targets[keep], sources[keep], weight[keep]
    if not len(targets):
        return _loadings_frame([])
    if chunks is None:
        shape = LoadingShape(graph.n_pos, lrm.model.d_model, lrm.n_layers, lrm.model.n_heads)
        chunks = plan_head_chunks(shape, len(torch.unique(targets)), len(torch.unique(sources)),
                                  default_budget_bytes() if memory_budget is None else memory_budget)
    edges = EdgeSet(targets, sources, weight, write[sources] + 1, read[targets].clamp(max=graph.n_layers - 1))
    position = node_positions(graph)
    unique_targets = torch.unique(targets)
    unique_targets = unique_targets[torch.argsort(position[unique_targets], stable=True)]  # short windows first
    records = []
    for chunk_targets in unique_targets.split(chunks.targets):
        records += _target_chunk_loadings(lrm, graph, edges, chunk_targets.sort().values, position, config, chunks)
    return _loadings_frame(records)


def crossing_attention(graph: AttributionGraph, targets: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Whether an attention layer lies between each edge's source and target (layers write + 1 .. read,
    a logit reading after the last layer).  [E], [E] -> [E] bool"""
    write, read = node_layers(graph)
    return write[sources] < read[targets].clamp(max=graph.n_layers - 1)


def edges_to_load(graph: AttributionGraph, targets: torch.Tensor, sources: torch.Tensor, influence: torch.Tensor,
                  share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The edges whose head loadings the stage computes: of those crossing attention, the most
    influential holding `share` of their summed `influence` (each edge's influence on the logits, as
    pruning scores it), by pruning's threshold rule (every edge at least as influential as the last one
    needed; share 1: every crossing edge).  [E] x 3 -> (targets, sources) [E']"""
    if not 0 < share <= 1:
        raise ValueError(f"the influence share must be in (0, 1], got {share}")
    keep = crossing_attention(graph, targets, sources)
    if share < 1 and bool((influence[keep] > 0).any()):
        keep &= influence >= find_threshold(influence[keep], share)
    return targets[keep], sources[keep]


@dataclass(frozen=True)
class EdgeSet:
    """The edges to load and the layers each crosses."""

    targets: torch.Tensor  # [E] graph node indices
    sources: torch.Tensor  # [E]
    weight: torch.Tensor  # [E]
    first: torch.Tensor  # [E] first layer crossed (the source's write layer + 1)
    last: torch.Tensor  # [E] last layer crossed (a feature reads resid_mid of its layer, after its attention)


def _target_chunk_loadings(lrm: LocalReplacementModel, graph: AttributionGraph, edges: EdgeSet,
                           chunk_targets: torch.Tensor, position: torch.Tensor, config: AttentionAttributionConfig,
                           chunks: HeadChunks) -> list[dict]:
    """Head loadings of the edges into one chunk of targets: one backward sweep for the targets, one
    forward sweep per chunk of their sources."""
    in_chunk = torch.isin(edges.targets, chunk_targets).nonzero().flatten()
    n_pos = int(position[chunk_targets].max()) + 1  # nothing after the last target reaches the targets
    layers = range(int(edges.first[in_chunk].min()), int(edges.last[in_chunk].max()) + 1)
    _, read = node_layers(graph)
    chunk_targets = chunk_targets[torch.argsort(read[chunk_targets], descending=True, stable=True)]
    z = head_side_gradients(lrm, graph_targets(lrm, graph, chunk_targets), n_pos, layers)
    sources = torch.unique(edges.sources[in_chunk])
    records = []
    for rows in position_blocks(position[sources], MIN_SOURCE_ROWS, chunks.sources):  # each from its own position
        chunk_sources = sources[rows]
        block = in_chunk[torch.isin(edges.sources[in_chunk], chunk_sources)]
        records += _block_loadings(lrm, graph, edges, block, chunk_targets, chunk_sources, z, n_pos,
                                   int(position[chunk_sources].min()), position, config, chunks)
    return records


def _block_loadings(lrm: LocalReplacementModel, graph: AttributionGraph, edges: EdgeSet, block: torch.Tensor,
                    chunk_targets: torch.Tensor, chunk_sources: torch.Tensor, z: dict[int, torch.Tensor],
                    n_pos: int, start: int, position: torch.Tensor, config: AttentionAttributionConfig,
                    chunks: HeadChunks) -> list[dict]:
    """Head loadings of the edges `block` (indices into `edges`), all between the two chunks: the sources
    swept forward layer by layer on positions [start, n_pos), live rows first."""
    write, _ = node_layers(graph)
    chunk_sources = chunk_sources[torch.argsort(write[chunk_sources], stable=True)]  # rows alive at a layer: a prefix
    source_write = write[chunk_sources]
    row_of = torch.full((graph.n_nodes,), -1)  # a node's row in its chunk
    row_of[chunk_targets] = torch.arange(len(chunk_targets))
    target_row = row_of[edges.targets[block]]
    row_of[chunk_sources] = torch.arange(len(chunk_sources))
    source_row = row_of[edges.sources[block]]
    first, last = edges.first[block], edges.last[block]
    writes = SourceWrites(lrm, graph, chunk_sources, start)
    resid = writes.embedded(len(chunk_sources), n_pos - start)
    records = []
    top = int(last.max())  # no edge crosses a higher layer
    for layer in range(top + 1):
        n_alive = int((source_write < layer).sum())
        if n_alive:
            values, heads_out = head_outputs(lrm, layer, resid[:n_alive], start)  # [Kv, S, P', dh], [H, S, P', dh]
            here = ((first <= layer) & (layer <= last)).nonzero().flatten()
            if len(here):
                z_window = z[layer][:, :, start:]  # [H, T, P', dh]
                parts = _head_parts(z_window, heads_out, target_row[here], source_row[here])  # [E, H]
                crossing = block[here]
                ends = position[edges.sources[crossing]], position[edges.targets[crossing]]
                record = _layer_rows(lrm, layer, crossing, parts, edges.weight[crossing], z_window, values,
                                     target_row[here], source_row[here], *ends, start, config, chunks.pairs)
                if record is not None:
                    edge = record.pop("edge")
                    records.append({"target": edges.targets[edge], "source": edges.sources[edge], **record})
            if layer == top:  # no later layer reads the residual
                break
            resid[:n_alive] += heads_out.permute(1, 2, 0, 3).flatten(2) @ lrm.model.W_O[layer].T
            if lrm.has_skip:  # resid_mid[layer] -> MLP-out[layer] via the skip
                resid[:n_alive] += skip_forward(resid[:n_alive], lrm.clt.W_skip[layer], lrm.model.mlp_norm[layer],
                                                lrm.skip_input_scale(layer)[start:n_pos])
        writes.add_mlp_writes(resid, layer)
    return records


def _head_parts(z: torch.Tensor, heads_out: torch.Tensor, target_row: torch.Tensor, source_row: torch.Tensor
                ) -> torch.Tensor:
    """part[e, h] = sum_q z[h, target_row[e], q] . heads_out[h, source_row[e], q], as one matmul per head
    over every (target, source) pair of the edges' targets and sources.
    z [H, T, P, dh], heads_out [H, S, P, dh] -> [E, H]"""
    targets, target_at = torch.unique(target_row, return_inverse=True)
    sources, source_at = torch.unique(source_row, return_inverse=True)
    z_rows = z[:, targets].flatten(2)  # [H, T', P*dh]
    out_rows = (heads_out if len(sources) == heads_out.shape[1] else heads_out[:, sources]).flatten(2)  # [H, S', P*dh]
    every = torch.bmm(z_rows, out_rows.transpose(1, 2))  # [H, T', S']
    return every[:, target_at, source_at].T


def _layer_rows(lrm: LocalReplacementModel, layer: int, edges: torch.Tensor, parts: torch.Tensor,
                weight: torch.Tensor, z: torch.Tensor, values: torch.Tensor, target_row: torch.Tensor,
                source_row: torch.Tensor, source_pos: torch.Tensor, target_pos: torch.Tensor, start: int,
                config: AttentionAttributionConfig, max_pairs: int) -> dict | None:
    """Rows for the edges this layer carries: big heads (with their main pair), other heads, skip.
    z [H, T, P', dh] and values [Kv, S, P', dh] on positions [start, start + P'); the edges' source and
    target positions [E] absolute."""
    scale = weight.abs()
    carried = parts.abs().sum(1) >= config.layer_min_share * scale
    if not carried.any():
        return None
    edges, parts, weight, scale = edges[carried], parts[carried], weight[carried], scale[carried]
    target_row, source_row = target_row[carried], source_row[carried]
    source_pos, target_pos = source_pos[carried], target_pos[carried]
    big = parts.abs() >= config.head_min_share * scale[:, None]  # [E, H]
    edge_index, head = big.nonzero().unbind(1)
    query, key, share = _main_pairs(lrm, layer, z, values, target_row[edge_index], source_row[edge_index], head,
                                    parts[edge_index, head], source_pos[edge_index], target_pos[edge_index], start,
                                    max_pairs)
    other = (parts * ~big).sum(1)
    has_other = (~big).any(1) & (other != 0)
    n_other, n_edges = int(has_other.sum()), len(edges)
    minus_one, nan = torch.full((n_other + n_edges,), -1), torch.full((n_other + n_edges,), float("nan"))
    return {
        "edge": torch.cat([edges[edge_index], edges[has_other], edges]),
        "layer": torch.full((len(edge_index) + n_other + n_edges,), layer),
        "head": torch.cat([head, torch.full((n_other,), OTHER_HEADS), torch.full((n_edges,), SKIP_HEAD)]),
        "weight": torch.cat([parts[edge_index, head], other[has_other], weight - parts.sum(1)]),
        "query_pos": torch.cat([query, minus_one]),
        "key_pos": torch.cat([key, minus_one]),
        "pair_share": torch.cat([share, nan]),
    }


def _main_pairs(lrm: LocalReplacementModel, layer: int, z: torch.Tensor, values: torch.Tensor,
                target_row: torch.Tensor, source_row: torch.Tensor, head: torch.Tensor, part: torch.Tensor,
                source_pos: torch.Tensor, target_pos: torch.Tensor, start: int, max_pairs: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each (edge, head) entry, the (query, key) pair carrying most of the head's part, and its share:
    pair[q, k] = pattern[h, q, k] * z[h, t, q] . values[h // group, s, k].

    Only the positions the edge connects are searched: z is zero after the target's position, the source's
    values before its own, so the grid is zero outside [source_pos, target_pos]^2 and its first largest
    |pair| (row-major, as over the whole grid) lies inside. Entries of similar window widths are taken
    together, padded to the widest; windows up to FULL_WIDTH are formed whole, in batches of at most the
    bytes of `max_pairs` whole grids; wider ones, for heads up to BOUNDED_MAX_HEAD_DIM wide, are searched
    row by row under a bound (`_bounded_pairs`), within the same bytes. An all-zero grid (a head with no path
    between the two) names the window's first position, `start`.
    z [H, T, P', dh], values [Kv, S, P', dh] on positions [start, start + P'); positions absolute
    -> (query [B], key [B], share [B])"""
    group = lrm.model.n_heads // lrm.model.n_kv_heads
    n_pos, head_dim = z.shape[2], z.shape[3]
    patterns = lrm.prompt.patterns[layer, :, start:start + n_pos, start:start + n_pos]  # [H, P', P']
    kv_head = torch.div(head, group, rounding_mode="floor")
    low, width = source_pos - start, target_pos - source_pos + 1  # [B] each entry's window, from low
    max_bytes = max_pairs * _grid_bytes(n_pos, head_dim)
    query, key = torch.empty(len(head), dtype=torch.long), torch.empty(len(head), dtype=torch.long)
    share = torch.empty(len(head))
    bucket = torch.ceil(2 * torch.log2(width.double())).long()  # widths within a factor sqrt(2) together
    bounds = None
    cells = OpenCells.of(patterns) if OpenCells.sparse_enough(patterns) else None
    by_cells = []  # the entries of buckets whose open cells are few enough to form alone
    for level in bucket.unique().tolist():
        entries = (bucket == level).nonzero().flatten()
        w = int(width[entries].max())
        if cells is not None:
            n_cells = cells.rows(head[entries], low[entries], low[entries] + width[entries])[1]
            if int(n_cells.sum()) * OPEN_CELL_COST < len(entries) * w * w:
                by_cells.append(entries)
                continue
        whole = w <= FULL_WIDTH or head_dim > BOUNDED_MAX_HEAD_DIM
        if not whole and bounds is None:
            bounds = GridBounds.of(z, values, patterns)
        per_entry = _grid_bytes(w, head_dim) if whole else _search_bytes(w, head_dim)
        for rows in entries.split(max(1, max_bytes // per_entry)):
            offset = low[rows].clamp(max=n_pos - w)  # [B] a window of width w holding the entry's own
            value_rows = values.unfold(2, w, 1)[kv_head[rows], source_row[rows], offset]  # [B, dh, w]
            if whole:
                pair = _grid_rows(z, value_rows, patterns, head[rows], target_row[rows], offset,
                                  torch.arange(w).expand(len(rows), -1))
                q, k, value = _first_largest(pair)
            else:
                q, k, value = _bounded_pairs(z, value_rows, patterns, bounds, head[rows], kv_head[rows],
                                             target_row[rows], source_row[rows], offset, max_bytes)
            found = value != 0
            offset = torch.where(found, offset, 0)
            query[rows] = torch.where(found, q, 0) + offset + start
            key[rows] = torch.where(found, k, 0) + offset + start
            share[rows] = value / part[rows]
    if by_cells:
        entries = torch.cat(by_cells)
        q, k, value = cells.first_largest(z, values, head[entries], kv_head[entries], target_row[entries],
                                          source_row[entries], low[entries], low[entries] + width[entries], max_bytes)
        found = value != 0
        query[entries] = torch.where(found, q, 0) + start
        key[entries] = torch.where(found, k, 0) + start
        share[entries] = value / part[entries]
    return query, key, share


@dataclass(frozen=True)
class OpenCells:
    """The nonzero (query, key) cells of one layer's patterns (a gated model's open edges) in row-major order
    per head, for windows whose grid is mostly closed: their cells are formed one by one, the closed ones
    (exact zeros in the grid) not at all. A cell is then a dh-term dot product of its own, which can round
    differently in the last bit from the bmm of a whole grid: the pair found is the grid's first largest up to
    that rounding (the same pair unless two cells are that close)."""

    n_pos: int  # P', the patterns' window
    query: torch.Tensor  # [N] window-relative positions of the open cells, sorted by (head, query, key)
    key: torch.Tensor  # [N]
    weight: torch.Tensor  # [N] their pattern weights
    row_start: torch.Tensor  # [H * P' + 1] the first cell of query row q of head h at h * P' + q

    @staticmethod
    def sparse_enough(patterns: torch.Tensor) -> bool:
        """Whether at most 1 / OPEN_CELL_COST of the causal cells are open, so that some windows may pay
        for forming their open cells alone (each bucket of windows is checked again).  patterns [H, P', P']"""
        n_heads, n_pos = patterns.shape[0], patterns.shape[1]
        return int(torch.count_nonzero(patterns)) * OPEN_CELL_COST <= n_heads * n_pos * (n_pos + 1) // 2

    @staticmethod
    def of(patterns: torch.Tensor) -> OpenCells:
        """patterns [H, P', P'] -> their open cells"""
        n_heads, n_pos = patterns.shape[0], patterns.shape[1]
        head, query, key = patterns.nonzero().unbind(1)  # row-major: by head, then query, then key
        per_row = torch.bincount(head * n_pos + query, minlength=n_heads * n_pos)
        row_start = torch.cat([torch.zeros(1, dtype=torch.long), per_row.cumsum(0)])
        return OpenCells(n_pos, query, key, patterns[head, query, key], row_start)

    def rows(self, head: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per entry, the open cells of its head's query rows [low, high) (keys below low among them):
        (first cell [B], count [B])"""
        first = self.row_start[head * self.n_pos + low]
        return first, self.row_start[head * self.n_pos + high] - first

    def first_largest(self, z: torch.Tensor, values: torch.Tensor, head: torch.Tensor, kv_head: torch.Tensor,
                      target_row: torch.Tensor, source_row: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                      max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per entry, the first (row-major) cell of largest |pair| among the open cells of its window
        [low, high)^2, pair = weight * z[head, target, query] . values[kv_head, source, key]; (low, low, 0) when
        every such pair is zero. Entries are taken a piece at a time, each piece's cells within `max_bytes`.
        z [H, T, P', dh], values [Kv, S, P', dh], the rest [B]  -> (query [B], key [B], value [B]) window-relative"""
        n_entries, head_dim = len(head), z.shape[3]
        query, key, value = low.clone(), low.clone(), torch.zeros(n_entries)
        first, n_cells = self.rows(head, low, high)
        z_rows, value_rows = z.flatten(0, 2), values.flatten(0, 2)  # [H * T * P', dh], [Kv * S * P', dh] (copies)
        z_base = (head * z.shape[1] + target_row) * self.n_pos  # [B] each entry's first row in z_rows
        value_base = (kv_head * values.shape[1] + source_row) * self.n_pos
        per_piece = max(1, max_bytes // (2 * head_dim * FLOAT_BYTES + OPEN_CELL_BYTES))  # cells at most
        ends = n_cells.cumsum(0)
        begin = 0
        while begin < n_entries:  # pieces of whole entries, at least one
            before = int(ends[begin] - n_cells[begin])  # the cells of the entries before the piece
            stop = max(begin + 1, int(torch.searchsorted(ends, before + per_piece, right=True)))
            piece = torch.arange(begin, stop)
            entry = torch.repeat_interleave(torch.arange(len(piece)), n_cells[piece])  # [C] piece-relative
            own_start = ends[piece] - n_cells[piece] - before  # [b] where each entry's cells begin in the piece
            cell = first[piece][entry] + torch.arange(len(entry)) - own_start[entry]
            keep = self.key[cell] >= low[piece][entry]  # the window's keys only: earlier keys carry no value
            entry, cell = entry[keep], cell[keep]
            at = piece[entry]
            pair = z_rows.index_select(0, z_base[at] + self.query[cell])  # [C, dh]
            pair = pair.mul_(value_rows.index_select(0, value_base[at] + self.key[cell])).sum(1).mul_(self.weight[cell])
            size = pair.abs()
            largest = torch.zeros(len(piece)).scatter_reduce_(0, entry, size, "amax")  # [b]
            is_largest = size == largest[entry]
            winner = torch.full((len(piece),), len(entry)).scatter_reduce_(
                0, entry[is_largest], is_largest.nonzero().flatten(), "amin")  # [b] each entry's first such cell
            found = largest > 0
            chosen = winner[found]
            query[piece[found]] = self.query[cell[chosen]]
            key[piece[found]] = self.key[cell[chosen]]
            value[piece[found]] = pair[chosen]
            begin = stop
        return query, key, value


def _grid_bytes(w: int, head_dim: int) -> int:
    """Bytes one entry's whole w x w grid takes: grids, pattern slices; z, values slices, a copy."""
    return w * (3 * w + 3 * head_dim) * FLOAT_BYTES


def _search_bytes(w: int, head_dim: int) -> int:
    """Bytes one entry of a bounded search holds besides its rounds' rows: its values slice, bounds
    (float64), their order, and the first round's rows (cells, pattern slices)."""
    return w * (2 * head_dim + 8 + 3 * FIRST_ROWS) * FLOAT_BYTES


def _grid_rows(z: torch.Tensor, value_rows: torch.Tensor, patterns: torch.Tensor, head: torch.Tensor,
               target_row: torch.Tensor, offset: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of each entry's (query, key) grid on its window [offset, offset + w):
    pair[b, i, k] = pattern[head, offset + rows[b, i], offset + k] * z[head, target, offset + rows[b, i]] .
    value_rows[b, :, k] (one bmm: a row's cells are the same bit for bit whichever rows are formed with it,
    for at least 12 rows of at least 12 keys or the whole grid: checked with this MKL, and bit for bit
    against forming every cell in tests/test_attribution_pairs.py).
    z [H, T, P', dh], value_rows [B, dh, w], patterns [H, P', P'], rows [B, r] -> [B, r, w]"""
    w = value_rows.shape[2]
    query = offset[:, None] + rows  # [B, r]
    pair = torch.bmm(z[head[:, None], target_row[:, None], query], value_rows)  # [B, r, w]
    return pair.mul_(patterns.unfold(2, w, 1)[head[:, None], query, offset[:, None]])


@dataclass(frozen=True)
class GridBounds:
    """What bounds one layer's (query, key) cells: |pair[q, k]| <= ||z[h, t, q]|| * pattern[h, q, k] *
    ||values[kv, s, k]|| (Cauchy-Schwarz). Loose per row, O(w) an entry: the pattern's largest weight from
    the window's first key on (`peak`) times the window's largest value norm; blocked per row, O(w^2 /
    KEY_BLOCK) an entry: over blocks of KEY_BLOCK keys, the block's largest pattern weight times its largest
    value norm. Norms and products in float64 (no underflow, rounding far below BOUND_MARGIN)."""

    z_norm: torch.Tensor  # [H, T, P'] float64
    value_norm: torch.Tensor  # [Kv, S, P'] float64
    peak: torch.Tensor  # [H, P', P'] max_{k >= j} pattern[h, q, k] at [h, q, j]
    block_peak: torch.Tensor  # [H, P', nb] max_{k in block b} pattern[h, q, k]
    block_value_norm: torch.Tensor  # [Kv, S, nb] float64 max_{k in block b} ||values[kv, s, k]||

    @staticmethod
    def of(z: torch.Tensor, values: torch.Tensor, patterns: torch.Tensor) -> GridBounds:
        peak = torch.empty_like(patterns)
        for h in range(len(patterns)):  # one head at a time: cummax's indices are int64
            peak[h] = patterns[h].flip(-1).cummax(-1).values.flip(-1)
        value_norm = torch.linalg.vector_norm(values, dim=-1, dtype=torch.float64)
        pad = -patterns.shape[-1] % KEY_BLOCK  # zeros: no pattern weight, no value
        block_peak = torch.nn.functional.pad(patterns, (0, pad)).unflatten(-1, (-1, KEY_BLOCK)).amax(-1)
        block_value_norm = torch.nn.functional.pad(value_norm, (0, pad)).unflatten(-1, (-1, KEY_BLOCK)).amax(-1)
        return GridBounds(torch.linalg.vector_norm(z, dim=-1, dtype=torch.float64), value_norm, peak, block_peak,
                          block_value_norm)

    def loose(self, head: torch.Tensor, kv_head: torch.Tensor, target_row: torch.Tensor, source_row: torch.Tensor,
              offset: torch.Tensor, w: int) -> torch.Tensor:
        """Per entry, a bound on every |pair| of each row of its window [offset, offset + w), with
        BOUND_MARGIN and BOUND_SLACK for float32 rounding and underflow in the cells.  -> [B, w] float64"""
        query = offset[:, None] + torch.arange(w)  # [B, w]
        z_norm = self.z_norm[head[:, None], target_row[:, None], query]
        value_norm = self.value_norm[kv_head[:, None], source_row[:, None], query].amax(1, keepdim=True)
        bound = z_norm * self.peak[head[:, None], query, offset[:, None]] * value_norm
        return bound * (1 + BOUND_MARGIN) + BOUND_SLACK

    def blocked(self, head: torch.Tensor, kv_head: torch.Tensor, target_row: torch.Tensor, source_row: torch.Tensor,
                offset: torch.Tensor, w: int) -> torch.Tensor:
        """As `loose`, per block of keys (every block: keys outside the window have no value or no weight).
        -> [B, w] float64"""
        query = offset[:, None] + torch.arange(w)  # [B, w]
        keys = self.block_peak[head[:, None], query] * self.block_value_norm[kv_head, source_row][:, None]  # [B, w, nb]
        bound = self.z_norm[head[:, None], target_row[:, None], query] * keys.amax(2)
        return bound * (1 + BOUND_MARGIN) + BOUND_SLACK


def _bounded_pairs(z: torch.Tensor, value_rows: torch.Tensor, patterns: torch.Tensor, bounds: GridBounds,
                   head: torch.Tensor, kv_head: torch.Tensor, target_row: torch.Tensor, source_row: torch.Tensor,
                   offset: torch.Tensor, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `_first_largest` gives on each entry's whole grid (`_grid_rows` of every row), without forming
    every row: rows are formed highest bound first, FIRST_ROWS under the loose bound, then under the blocked
    one FIRST_ROWS more, then four times as many each round, until no row left unformed has a bound reaching
    the largest |pair| found. Every row holding the largest is then formed; the first of them (and its first
    such column) is kept across rounds, so the answer is the grid's, and the cells, formed by the same bmm, are
    the same values. A round holds at most `max_bytes` of rows at once.
    z [H, T, P', dh], value_rows [B, dh, w], patterns [H, P', P'], the rest [B] -> (row, column, value) [B]"""
    n_entries, head_dim, w = value_rows.shape
    bound = bounds.loose(head, kv_head, target_row, source_row, offset, w)  # [B, w]; -1 once a row is formed
    largest = torch.full((n_entries,), -1.0)  # the largest |pair| formed so far
    row, column = torch.full((n_entries,), w), torch.zeros(n_entries, dtype=torch.long)
    value = torch.zeros(n_entries)
    pending, n_rows, blocked = torch.arange(n_entries), FIRST_ROWS, False
    while len(pending):
        n = min(n_rows, w)  # at least FIRST_ROWS rows a bmm (formed rows again once fewer are left)
        unsettled = []
        for piece in pending.split(max(1, max_bytes // (n * (3 * w + head_dim) * FLOAT_BYTES))):
            piece_bound = bound[piece]
            chosen = torch.argsort(piece_bound, dim=1, descending=True, stable=True)[:, :n]  # [b, n]
            cells = _grid_rows(z, value_rows[piece], patterns, head[piece], target_row[piece], offset[piece],
                               chosen)  # [b, n, w]
            row_size = torch.maximum(cells.amax(2), cells.amin(2).neg_())  # [b, n]
            size = row_size.amax(1)  # [b]
            first = torch.where(row_size == size[:, None], chosen, w).argmin(1)  # [b] index into n
            first_row = chosen.gather(1, first[:, None])[:, 0]  # [b]
            better = (size > largest[piece]) | ((size == largest[piece]) & (first_row < row[piece]))
            taken = piece[better]
            found = cells[better.nonzero().flatten(), first[better]]  # [d, w]
            largest[taken], row[taken] = size[better], first_row[better]
            column[taken] = found.abs().argmax(1)
            value[taken] = found.gather(1, column[taken, None])[:, 0]
            bound[piece] = piece_bound.scatter_(1, chosen, -1.0)
            unsettled.append(piece[bound[piece].amax(1) >= largest[piece]])  # a row left might reach it
        pending = torch.cat(unsettled)
        if blocked:
            n_rows *= 4
            continue
        n_blocks = bounds.block_peak.shape[-1]
        for piece in pending.split(max(1, max_bytes // (w * n_blocks * 5 * FLOAT_BYTES))):  # float64 products
            bound[piece] = torch.minimum(bound[piece], bounds.blocked(head[piece], kv_head[piece], target_row[piece],
                                                                      source_row[piece], offset[piece], w))
        pending = pending[bound[pending].amax(1) >= largest[pending]]
        blocked = True
    return row, column, value


def _first_largest(grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per grid, the first (row-major) cell of largest |value|: the first row holding the largest, then its first
    such column (vectorised row maxima; a flat argmax over every cell is several times slower on CPU).
    grids [B, R, C] -> (row [B], column [B], value [B])"""
    row_size = torch.maximum(grids.amax(2), grids.amin(2).neg_())  # [B, R] the largest |value| per row, exactly
    largest = row_size.amax(1, keepdim=True)  # [B, 1]
    row = (row_size == largest).to(torch.uint8).argmax(1)  # [B] the first row holding it
    cells = grids[torch.arange(len(grids)), row]  # [B, C]
    column = cells.abs().argmax(1)  # [B]
    return row, column, cells.gather(1, column[:, None])[:, 0]


def _loadings_frame(records: list[dict]) -> pd.DataFrame:
    """One frame of LOADING_COLUMNS from the records, sorted by (target, source, layer, head)."""
    if not records:
        return pd.DataFrame({c: pd.Series(dtype=dtype) for c, dtype in LOADING_DTYPES.items()})
    columns = {c: np.concatenate([r[c].numpy() for r in records]).astype(dtype) for c, dtype in LOADING_DTYPES.items()}
    order = np.lexsort([columns[c] for c in ("head", "layer", "source", "target")])  # last key first
    return pd.DataFrame({c: values[order] for c, values in columns.items()})
