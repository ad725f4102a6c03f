"""Head loadings: per-head parts checked by ablating heads (and single attention edges) in the
HF model's frozen forward pass; parts plus the skip part sum to the edge. With a CLT skip path too
(edges then also run through the MLPs' skips)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.graph import attribute
from attribution.heads import OTHER_HEADS, SKIP_HEAD, edges_to_load, head_loadings, node_layers
from attribution.prune import prune
from attribution.stage import kept_edges, settings_json
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


@pytest.mark.parametrize("kind, skip", [("dense", False), ("gated", False), ("gated", True)])
def test_head_parts_match_head_ablation(kind, skip):
    model, lrm = replacement(kind, skip=skip)
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


@pytest.mark.parametrize("skip", [False, True])
def test_main_pair_matches_single_attention_edge_ablation(skip):
    model, lrm = replacement("gated", skip=skip)
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


def test_influence_share_loads_the_most_influential_crossing_edges():
    _, lrm = replacement("gated")
    graph = attribute(lrm, GraphConfig())
    pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos, row_nodes=graph.row_nodes)
    targets, sources, influence = kept_edges(graph, pruned)
    write, read = node_layers(graph)
    crossing = write[sources] < read[targets].clamp(max=graph.n_layers - 1)  # an attention layer between them
    assert 0 < int(crossing.sum()) < len(targets)
    every = edges_to_load(graph, targets, sources, influence, 1.0)
    assert torch.equal(torch.stack(every), torch.stack([targets[crossing], sources[crossing]]))
    ordered = influence[crossing].sort(descending=True).values
    n_needed = int((ordered.cumsum(0) < 0.5 * ordered.sum()).sum()) + 1  # fewest edges holding half
    chosen = crossing & (influence >= ordered[n_needed - 1])
    assert 0 < int(chosen.sum()) < int(crossing.sum())
    half = edges_to_load(graph, targets, sources, influence, 0.5)
    assert torch.equal(torch.stack(half), torch.stack([targets[chosen], sources[chosen]]))
    with pytest.raises(ValueError, match="influence share"):
        edges_to_load(graph, targets, sources, influence, 0.0)
    # the loadings of the chosen edges are those rows of every crossing edge's loadings
    config = AttentionAttributionConfig(layer_min_share=0.0, head_min_share=0.05)
    whole = head_loadings(lrm, graph, *every, config)
    loaded = head_loadings(lrm, graph, *half, config)
    expected = whole.merge(pd.DataFrame({"target": half[0].numpy(), "source": half[1].numpy()}))
    pd.testing.assert_frame_equal(loaded.reset_index(drop=True), expected.reset_index(drop=True))


def test_influence_share_at_one_leaves_graph_ids_as_they_were():
    config = AttributionStageConfig()
    assert json.loads(settings_json(config))["attention"]["edge_influence_share"] == 0.9
    every = config.model_copy(update={"attention": config.attention.model_copy(update={"edge_influence_share": 1.0})})
    assert "edge_influence_share" not in settings_json(every)  # the ids graphs had before the setting existed
