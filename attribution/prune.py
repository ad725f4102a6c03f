"""Influence, pruning and graph scores, with circuit-tracer's exact semantics so results compare.

Influence on the logits = logit weights x (A + A^2 + ...), with |A| row-normalised (rows = targets).
Pruning keeps the nodes holding `node_threshold` (0.8) of the influence, then the edges holding
`edge_threshold` (0.98) of the edge influence, then drops nodes left without edges (tokens and
logits always stay). Scores: replacement (token vs error influence) and completeness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def normalize_rows(adjacency: torch.Tensor) -> torch.Tensor:
    """|A| with every row summing to 1 (rows of zeros stay zero).  [N, N] -> [N, N]"""
    absolute = adjacency.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)


def influence(normalized: torch.Tensor, logit_weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """logit_weights @ (A + A^2 + ...) by power iteration; A must be nilpotent (a DAG).  -> [N]"""
    current = logit_weights @ normalized
    total = current
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
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
    edge_mask: torch.Tensor  # [N, N] bool, rows = targets
    node_influence: torch.Tensor  # [N] influence on the logits
    cumulative_influence: torch.Tensor  # [N] fraction of influence held by nodes at least this influential


def prune(adjacency: torch.Tensor, logit_probs: torch.Tensor, n_features: int, n_pos: int,
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """circuit-tracer's prune_graph on an adjacency in its node order (features, errors, tokens, logits)."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    n_nodes, n_logits = adjacency.shape[0], len(logit_probs)
    n_kept_always = n_logits + n_pos  # tokens and logits
    weights = logit_weight_vector(n_nodes, logit_probs)

    node_influence = influence(normalize_rows(adjacency), weights)
    node_mask = node_influence >= find_threshold(node_influence, node_threshold)
    node_mask[-n_kept_always:] = True

    pruned = adjacency.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_rows(pruned)
    edge_scores = normalized * (influence(normalized, weights) + weights)[:, None]
    edge_mask = edge_scores >= find_threshold(edge_scores.flatten(), edge_threshold)

    old_mask = node_mask.clone()
    _drop_dangling(node_mask, edge_mask, n_features, n_kept_always)
    while not torch.equal(node_mask, old_mask):
        old_mask.copy_(node_mask)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        _drop_dangling(node_mask, edge_mask, n_features, n_kept_always)

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative = torch.zeros_like(node_influence)
    cumulative[order] = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    return PruneResult(node_mask, edge_mask, node_influence, cumulative)


def _drop_dangling(node_mask: torch.Tensor, edge_mask: torch.Tensor, n_features: int, n_kept_always: int) -> None:
    """Features and errors need an outgoing edge; features need an incoming one (in place)."""
    node_mask[:-n_kept_always] &= edge_mask[:, :-n_kept_always].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)


def graph_scores(adjacency: torch.Tensor, logit_probs: torch.Tensor, n_features: int, n_layers: int,
                 n_pos: int) -> tuple[float, float]:
    """(replacement score, completeness score) as circuit-tracer's compute_graph_scores.

    Replacement: token influence / (token + error influence). Completeness: the non-error share of each
    node's inputs, averaged with weights influence + logit weight.
    """
    error_start, error_end = n_features, n_features + n_layers * n_pos
    weights = logit_weight_vector(adjacency.shape[0], logit_probs)
    normalized = normalize_rows(adjacency)
    node_influence = influence(normalized, weights)
    token_influence = node_influence[error_end:error_end + n_pos].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement = token_influence / (token_influence + error_influence)
    non_error = 1 - normalized[:, error_start:error_end].sum(dim=-1)
    output_influence = node_influence + weights
    completeness = (non_error * output_influence).sum() / output_influence.sum()
    return float(replacement), float(completeness)


def partial_influences(edge_rows: torch.Tensor, logit_probs: torch.Tensor, row_to_node: torch.Tensor,
                       max_iter: int = 128) -> torch.Tensor:
    """Influence from the rows computed so far (circuit-tracer's compute_partial_influences), used to
    pick which features to visit next when max_feature_nodes caps the graph.

    edge_rows [R, N] (rows in visit order, logits first); row_to_node [R] node index of each row -> [N]
    """
    normalized = edge_rows.abs()
    normalized /= normalized.sum(dim=1, keepdim=True).clamp(min=1e-8)
    total = torch.zeros(edge_rows.shape[1])
    current = torch.zeros(edge_rows.shape[1])
    current[-len(logit_probs):] = logit_probs
    for _ in range(max_iter):
        current = current[row_to_node] @ normalized
        if not current.any():
            return total
        total += current
    raise RuntimeError("partial influences did not converge")
