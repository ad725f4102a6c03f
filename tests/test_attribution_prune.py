"""Pruning and graph scores on hand-built graphs whose answers are worked out by hand."""

from __future__ import annotations

import pytest
import torch

from attribution.prune import graph_scores, influence, normalize_rows, prune


def hand_graph() -> torch.Tensor:
    """3 features, 1 layer x 2 positions of errors, 2 tokens, 1 logit: f0 f1 f2 e0 e1 t0 t1 L."""
    f0, f1, f2, t0, t1, logit = 0, 1, 2, 5, 6, 7
    adjacency = torch.zeros(8, 8)
    adjacency[logit, f0], adjacency[logit, f1], adjacency[logit, f2] = 8.0, -2.0, 0.2
    adjacency[f0, t1] = 1.0
    adjacency[f1, f0], adjacency[f1, t0] = 1.0, -1.0
    adjacency[f2, t0] = 1.0
    return adjacency


def test_influence_of_hand_graph():
    weights = torch.zeros(8)
    weights[7] = 1.0
    got = influence(normalize_rows(hand_graph()), weights)
    # L row normalised: f0 8/10.2, f1 2/10.2, f2 0.2/10.2; then f1 splits half to f0 and t0
    f0, f1, f2 = 8 / 10.2, 2 / 10.2, 0.2 / 10.2
    expected = torch.tensor([f0 + f1 / 2, f1, f2, 0, 0, f1 / 2 + f2, f0 + f1 / 2, 0])
    torch.testing.assert_close(got, expected)


def test_prune_hand_graph():
    result = prune(hand_graph(), torch.tensor([1.0]), n_features=3, n_pos=2, node_threshold=0.999,
                   edge_threshold=0.9)
    # f2 passes the node threshold, but its only outgoing edge (score 0.0196) misses the edge
    # threshold (0.098), so f2 goes, and its incoming edge from t0 with it; errors have no influence.
    assert result.node_mask.tolist() == [True, True, False, False, False, True, True, True]
    kept = {tuple(e) for e in result.edge_mask.nonzero().tolist()}
    assert kept == {(7, 0), (7, 1), (0, 6), (1, 0), (1, 5)}
    assert result.cumulative_influence[0] == pytest.approx(0.882 / 2.0972, abs=1e-3)


def test_default_thresholds_keep_the_dominant_path():
    adjacency = hand_graph()
    result = prune(adjacency, torch.tensor([1.0]), n_features=3, n_pos=2)
    # node influence: f0 .882, t1 .882, f1 .196, t0 .118, f2 .020: 80% is reached by f0 and t1
    assert result.node_mask.tolist() == [True, False, False, False, False, True, True, True]
    assert {tuple(e) for e in result.edge_mask.nonzero().tolist()} == {(7, 0), (0, 6)}


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="node_threshold"):
        prune(hand_graph(), torch.tensor([1.0]), 3, 2, node_threshold=1.5)


def test_scores_of_hand_graph():
    # f0 e0 t0 L: the logit reads f0 (3) and the error (1); f0 reads the token
    adjacency = torch.zeros(4, 4)
    adjacency[3, 0], adjacency[3, 1], adjacency[0, 2] = 3.0, -1.0, 1.0
    replacement, completeness = graph_scores(adjacency, torch.tensor([1.0]), n_features=1, n_layers=1, n_pos=1)
    assert replacement == pytest.approx(0.75)
    assert completeness == pytest.approx((0.75 + 0.25 + 0.75 + 0.75) / 2.75)


def test_kept_edges_carry_their_influence():
    result = prune(hand_graph(), torch.tensor([1.0]), n_features=3, n_pos=2, node_threshold=0.999,
                   edge_threshold=0.9)
    # in nonzero() order (0,6) (1,0) (1,5) (7,0) (7,1): f0 reads only t1 with f0's influence 0.784 + 0.196 / 2;
    # f1 splits its 0.196 over f0 and t0; the logit's row (weight 1) 8, -2 of 10.2 (f2's 0.2 stays in the sum)
    expected = torch.tensor([8 / 10.2 + 1 / 10.2, 1 / 10.2, 1 / 10.2, 8 / 10.2, 2 / 10.2])
    torch.testing.assert_close(result.kept_edge_influence, expected)
