"""Head loadings: per-head parts checked by ablating heads (and single attention edges) in the
HF model's frozen forward pass; parts plus the skip part sum to the edge."""

from __future__ import annotations

import pytest
import torch

from attribution.budget import MemoryBudgetError
from attribution.config import AttentionAttributionConfig, GraphConfig
from attribution.graph import attribute
from attribution.heads import (
    MAX_PAIR_CHUNK,
    OTHER_HEADS,
    SKIP_HEAD,
    HeadChunks,
    LoadingShape,
    chunk_bytes,
    head_loadings,
    plan_head_chunks,
)
from tests.test_attribution import closeness_scale, frozen_forward, replacement, source_removal, target_values


def edge_in_forward(model, lrm, graph, target: int, source: int, patterns: torch.Tensor) -> float:
    """The edge measured by removing the source in a frozen forward with the given patterns."""
    zero = torch.zeros(graph.n_pos, lrm.model.d_model)
    base = target_values(lrm, graph, *frozen_forward(model, lrm, lrm.prompt.mlp_out, zero, patterns))
    moved = target_values(lrm, graph, *frozen_forward(model, lrm, *source_removal(lrm, graph, source), patterns))
    return float(base[target] - moved[target])


def strongest_edges(graph, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n largest edges between different positions (they must cross attention)."""
    table = graph.node_table()
    adjacency = graph.adjacency.clone()
    adjacency[table["pos"][:, None] == table["pos"][None, :]] = 0
    flat = adjacency.abs().flatten().topk(n).indices
    return flat // graph.n_nodes, flat % graph.n_nodes


@pytest.mark.parametrize("kind", ["dense", "gated"])
def test_head_parts_match_head_ablation(kind):
    model, lrm = replacement(kind)
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 6)
    all_parts = AttentionAttributionConfig(layer_min_share=0.0, head_min_share=0.0)
    loadings = head_loadings(lrm, graph, targets, sources, all_parts)
    assert not (loadings["head"] == OTHER_HEADS).any()
    scale = closeness_scale(graph)
    for (target, source, layer), rows in loadings.groupby(["target", "source", "layer"]):
        weight = float(graph.adjacency[target, source])
        tolerance = 1e-5 * float(scale[target])
        assert abs(rows["weight"].sum() - weight) <= tolerance  # heads + skip = edge
        for head, part in zip(rows["head"], rows["weight"]):
            patterns = lrm.prompt.patterns.clone()
            if head == SKIP_HEAD:
                patterns[layer] = 0
                assert abs(edge_in_forward(model, lrm, graph, target, source, patterns) - part) <= tolerance
            else:
                patterns[layer, head] = 0
                ablated = edge_in_forward(model, lrm, graph, target, source, patterns)
                assert abs((weight - ablated) - part) <= tolerance


def test_main_pair_matches_single_attention_edge_ablation():
    model, lrm = replacement("gated")
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 4)
    loadings = head_loadings(lrm, graph, targets, sources, AttentionAttributionConfig(head_min_share=0.2))
    heads = loadings[loadings["head"] >= 0]
    assert len(heads) > 0
    scale = closeness_scale(graph)
    for row in heads.itertuples():
        assert lrm.prompt.patterns[row.layer, row.head, row.query_pos, row.key_pos] != 0  # an open gate
        patterns = lrm.prompt.patterns.clone()
        patterns[row.layer, row.head, row.query_pos, row.key_pos] = 0
        weight = float(graph.adjacency[row.target, row.source])
        ablated = edge_in_forward(model, lrm, graph, row.target, row.source, patterns)
        assert abs((weight - ablated) - row.weight * row.pair_share) <= 1e-5 * float(scale[row.target])


def test_thresholds_fold_small_heads_into_one_row():
    _, lrm = replacement("dense")
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 6)
    loadings = head_loadings(lrm, graph, targets, sources, AttentionAttributionConfig(head_min_share=0.3))
    for (target, source, _), rows in loadings.groupby(["target", "source", "layer"]):
        assert abs(rows["weight"].sum() - float(graph.adjacency[target, source])) <= 1e-5 * float(
            closeness_scale(graph)[target])
        big = rows[rows["head"] >= 0]
        assert (big["weight"].abs() >= 0.3 * abs(float(graph.adjacency[target, source])) - 1e-6).all()


def assert_same_loadings(chunked, unchunked, scale: float) -> None:
    """Same rows (in the same order), weights and pair shares to 1e-6 (shares relative to their size)."""
    keys = ["target", "source", "layer", "head", "query_pos", "key_pos"]
    assert chunked[keys].values.tolist() == unchunked[keys].values.tolist()
    assert (chunked["weight"] - unchunked["weight"]).abs().max() <= 1e-6 * scale
    shares = unchunked["pair_share"].notna()
    assert chunked["pair_share"].notna().tolist() == shares.tolist()
    difference = (chunked["pair_share"][shares] - unchunked["pair_share"][shares]).abs()
    assert (difference <= 1e-6 * unchunked["pair_share"][shares].abs().clip(lower=1)).all()


@pytest.mark.parametrize("kind", ["dense", "gated"])
def test_chunked_loadings_equal_unchunked(kind):
    _, lrm = replacement(kind)
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 40)
    config = AttentionAttributionConfig(layer_min_share=0.0, head_min_share=0.1)
    unchunked = head_loadings(lrm, graph, targets, sources, config, chunks=HeadChunks(10**6, 10**6, 10**6))
    assert (unchunked["head"] >= 0).sum() > 10 and unchunked["target"].nunique() > 3
    scale = float(graph.adjacency.abs().max())
    for chunks in (HeadChunks(1, 1, 1), HeadChunks(2, 3, 5), HeadChunks(7, 1, 64)):
        assert_same_loadings(head_loadings(lrm, graph, targets, sources, config, chunks=chunks), unchunked, scale)
    shape = LoadingShape(graph.n_pos, lrm.model.d_model, lrm.n_layers, lrm.model.n_heads)
    budget = chunk_bytes(HeadChunks(2, 3, 4), shape)
    assert plan_head_chunks(shape, 40, 40, budget).targets <= 2
    assert_same_loadings(head_loadings(lrm, graph, targets, sources, config, memory_budget=budget), unchunked, scale)


def test_chunk_plan_fits_the_budget_or_refuses():
    shape = LoadingShape(n_pos=256, d_model=64, n_layers=4, n_heads=4)
    roomy = plan_head_chunks(shape, n_targets=500, n_sources=2000, budget_bytes=2**34)
    assert (roomy.targets, roomy.sources) == (500, 2000)
    for budget in (2**22, 2**25, 2**28):
        chunks = plan_head_chunks(shape, n_targets=500, n_sources=2000, budget_bytes=budget)
        assert chunk_bytes(chunks, shape) <= budget
        assert chunk_bytes(HeadChunks(chunks.targets, chunks.sources, chunks.pairs + 1), shape) > budget or \
            chunks.pairs == MAX_PAIR_CHUNK
    with pytest.raises(MemoryBudgetError, match="head loadings of a 256-position prompt need at least"):
        plan_head_chunks(shape, n_targets=500, n_sources=2000, budget_bytes=chunk_bytes(HeadChunks(1, 1, 1), shape) - 1)


def test_every_layer_an_edge_crosses_has_rows():
    _, lrm = replacement("dense")
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 30)
    loadings = head_loadings(lrm, graph, targets, sources, AttentionAttributionConfig(layer_min_share=0.0))
    table = graph.node_table()
    layer = table["layer"].clamp(max=graph.n_layers - 1)  # a feature at layer l reads after l's attention
    crossed = {(t, s): set(range(int(table["layer"][s]) + 1 if s < graph.token_start else 0, int(layer[t]) + 1))
               for t, s in zip(targets.tolist(), sources.tolist())}
    assert any(min(layers) == int(layer[t]) for (t, _), layers in crossed.items() if layers)  # a target's own layer
    found = loadings.groupby(["target", "source"])["layer"].agg(set).to_dict()
    assert found == {edge: layers for edge, layers in crossed.items() if layers}
