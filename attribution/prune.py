"""Influence, pruning and graph scores, with circuit-tracer's exact semantics so results compare.

Influence on the logits = logit weights x (A + A^2 + ...), with |A| row-normalised (rows = targets).
Pruning keeps the nodes holding `node_threshold` (0.8) of the influence, then the edges holding
`edge_threshold` (0.98) of the edge influence, then drops nodes left without edges (tokens and
logits always stay). Scores: replacement (token vs error influence) and completeness.

An edge's influence (its score in pruning) is its share of its target's inputs in the node-pruned graph,
|A[t, s]| / sum_s' |A[t, s']|, times the target's influence plus its logit weight: the part of the
logits' influence that flows through the edge. Pruning returns it for every edge it keeps.

Each function works on a row-form matrix too: `rows` [R, N] holding the rows of the nodes `row_nodes`,
every other row zero (a graph's features and logits: error and token nodes have no incoming edges), so
memory and time grow with R x N, not N x N. The dense forms (`prune`, `graph_scores`) pass every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def normalize_rows(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with every row summing to 1 (rows of zeros stay zero).  [N, N] -> [N, N]"""
    absolute = adjacency.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(normalized: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000,
              row_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """logit_weights @ (A + A^2 + ...) by power iteration; A must be nilpotent (a DAG).  -> [N]
    normalized: [N, N], or [R, N] holding the rows of nodes `row_nodes` (the other rows zero)."""
    if row_nodes is None:
        row_nodes = torch.arange(normalized.shape[0])
    current = logit_weights[row_nodes] @ normalized
    total = current
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current[row_nodes] @ normalized
        total = total + current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations: the graph has a cycle")


def logit_weight_vector(n_nodes: int, logit_probs: torch.Tensor) -> torch.Tensor:
    """[N] zeros with the logit nodes (last) weighted by their probabilities."""
    weights = torch.zeros(n_nodes)
    weights[n_nodes - len(logit_probs):] = logit_probs
    return weights


def find_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score above which the largest scores hold `threshold` of the total."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    index = min(int(torch.searchsorted(cumulative, threshold).item()), len(cumulative) - 1)
    return ordered[index]


@dataclass(frozen=True)
class PruneResult:
    node_mask: torch.Tensor  # [N] bool
    edge_mask: torch.Tensor  # [R, N] bool, rows = targets: the rows of nodes `row_nodes` (R = N: every node)
    node_influence: torch.Tensor  # [N] influence on the logits
    cumulative_influence: torch.Tensor  # [N] fraction of influence held by nodes at least this influential
    row_nodes: torch.Tensor  # [R] long, the node of each row of edge_mask
    kept_edge_influence: torch.Tensor  # [K] each kept edge's influence (edge score), edge_mask.nonzero() order

    def kept(self, targets: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Whether pruning keeps each edge (targets[i] <- sources[i]).  -> [E] bool"""
        row = row_index(self.row_nodes, len(self.node_mask))[targets]
        kept = torch.zeros(len(targets), dtype=torch.bool)
        has_row = row >= 0
        kept[has_row] = self.edge_mask[row[has_row], sources[has_row]]
        return kept

    def edge_rows(self, nodes: torch.Tensor) -> torch.Tensor:
        """The rows of edge_mask for `nodes` (all False for a node without a row).  -> [len(nodes), N] bool"""
        row = row_index(self.row_nodes, len(self.node_mask))[nodes]
        out = torch.zeros(len(nodes), self.edge_mask.shape[1], dtype=torch.bool)
        out[row >= 0] = self.edge_mask[row[row >= 0]]
        return out


def row_index(row_nodes: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Per node, its row in a row-form matrix whose rows are the nodes `row_nodes`; -1 for none.  -> [N] long"""
    index = torch.full((n_nodes,), -1)
    index[row_nodes] = torch.arange(len(row_nodes))
    return index


def prune(adjacency: torch.Tensor, logit_probs: torch.Tensor, n_features: int, n_pos: int,
          node_threshold: float = 0.8, edge_threshold: float = 0.98, row_nodes: torch.Tensor | None = None
          ) -> PruneResult:
    """circuit-tracer's prune_graph on an adjacency in its node order (features, errors, tokens, logits):
    [N, N], or row form [R, N] with `row_nodes` (a graph's `rows` and `row_nodes`; the other rows are zero)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if row_nodes is None:
        row_nodes = torch.arange(adjacency.shape[0])
    n_nodes, n_logits = adjacency.shape[1], len(logit_probs)
    n_kept_always = n_logits + n_pos  # tokens and logits
    weights = logit_weight_vector(n_nodes, logit_probs)

    node_influence = influence(normalize_rows(adjacency), weights, row_nodes=row_nodes)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[-n_kept_always:] = True

    pruned = adjacency.clone()
    pruned[~node_mask[row_nodes]] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    del pruned
    edge_scores = normalized.mul_((influence(normalized, weights, row_nodes=row_nodes) + weights)[row_nodes, None])
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)
    candidates = edge_mask.nonzero()  # [K0, 2] (row, node)
    candidate_influence = edge_scores[edge_mask]  # [K0], row-major like nonzero()
    del edge_scores, normalized

    old_mask = node_mask.clone()
    _drop_dangling(node_mask, edge_mask, row_nodes, n_features, n_kept_always)
    while not torch.equal(node_mask, old_mask):
        old_mask.copy_(node_mask)
        edge_mask[~node_mask[row_nodes]] = False
        edge_mask[:, ~node_mask] = False
        _drop_dangling(node_mask, edge_mask, row_nodes, n_features, n_kept_always)

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    still_kept = edge_mask[candidates[:, 0], candidates[:, 1]]
    return PruneResult(node_mask, edge_mask, node_influence, cumulative, row_nodes, candidate_influence[still_kept])


def _drop_dangling(node_mask: torch.Tensor, edge_mask: torch.Tensor, row_nodes: torch.Tensor, n_features: int,
                   n_kept_always: int) -> None:
    """Features and errors need an outgoing edge; features need an incoming one (in place)."""
    node_mask[:-n_kept_always] &= edge_mask[:, :-n_kept_always].any(0)
    has_incoming = torch.zeros(len(node_mask), dtype=torch.bool)
    has_incoming[row_nodes] = edge_mask.any(1)
    node_mask[:n_features] &= has_incoming[:n_features]


def graph_scores(adjacency: torch.Tensor, logit_probs: torch.Tensor, n_features: int, n_layers: int,
                 n_pos: int, row_nodes: torch.Tensor | None = None) -> tuple[float, float]:
    """(replacement score, completeness score) as circuit-tracer's compute_graph_scores; adjacency [N, N],
    or row form [R, N] with `row_nodes`.

    Replacement: token influence / (token + error influence). Completeness: the non-error share of each
    node's inputs, averaged with weights influence + logit weight (a node without a row: all non-error).
    """
    if row_nodes is None:
        row_nodes = torch.arange(adjacency.shape[0])
    error_start, error_end = n_features, n_features + n_layers * n_pos
    weights = logit_weight_vector(adjacency.shape[1], logit_probs)
    normalized = normalize_rows(adjacency)
    node_influence = influence(normalized, weights, row_nodes=row_nodes)
    token_influence = node_influence[error_end:error_end + n_pos].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement = token_influence / (token_influence + error_influence)
    non_error = torch.ones(adjacency.shape[1])
    non_error[row_nodes] = 1 - normalized[:, error_start:error_end].sum(dim=-1)
    output_influence = node_influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)


PARTIAL_CHUNK_ROWS = 64  # rows of |edge_rows| formed together by partial_influences


def partial_influences(edge_rows: torch.Tensor, logit_probs: torch.Tensor, row_to_node: torch.Tensor,
                       max_iter: int = 128, chunk_rows: int = PARTIAL_CHUNK_ROWS) -> torch.Tensor:
    """Influence from the rows computed so far (circuit-tracer's compute_partial_influences), used to
    pick which features to visit next when max_feature_nodes caps the graph.

    The influence only flows on through nodes that have a row, so the power iteration runs on the
    [R, R] block of row-normalised |edge_rows| between them, and one pass over all columns ends it:
    total = (x_0 + x_1 + ...) @ normalized, x_0 the logit weights on the rows, x_{i+1} = x_i @ block.
    |edge_rows| is formed a chunk of rows at a time, never whole.

    edge_rows [R, N] (rows in visit order, logits first); row_to_node [R] node index of each row -> [N]
    """
    n_rows, n_columns = edge_rows.shape
    row_sums = torch.empty(n_rows)
    block = torch.empty(n_rows, n_rows)  # [R, R] normalised |edge| from each row's node into each row's node
    for rows in torch.arange(n_rows).split(chunk_rows):
        absolute = edge_rows[rows].abs_()
        row_sums[rows] = absolute.sum(1).clamp_(min=1e-8)
        block[rows] = absolute[:, row_to_node] / row_sums[rows, None]
    weights = torch.zeros(n_columns)
    weights[-len(logit_probs):] = logit_probs
    current = weights[row_to_node]  # x_0
    reaching = current.clone()  # x_0 + x_1 + ...: the influence arriving at each row's node
    for _ in range(max_iter):
        current = current @ block
        if not current.any():
            break
        reaching += current
    else:
        raise RuntimeError("partial influences did not converge")
    total = torch.zeros(n_columns)
    for rows in torch.arange(n_rows).split(chunk_rows):
        total += (reaching[rows] / row_sums[rows]) @ edge_rows[rows].abs()
    return total
