"""Head loadings and QK attribution in bounded chunks: the same numbers at every chunk size (to 1e-6),
chunk plans that fit their byte budget or refuse, and every layer an edge crosses present."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from attribution.budget import MemoryBudgetError
from attribution.config import AttentionAttributionConfig, GraphConfig
from attribution.graph import attribute
from attribution.heads import (
    MAX_PAIR_CHUNK,
    HeadChunks,
    LoadingShape,
    chunk_bytes,
    head_loadings,
    plan_head_chunks,
)
from attribution.qk import (
    QK_COLUMNS,
    QKChunks,
    ResidualComponents,
    qk_attribution,
    qk_pair_contributions,
    qk_rows,
)
from tests.test_attribution import replacement
from tests.test_attribution_heads import strongest_edges


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
    for budget in (2**23, 2**25, 2**28):
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


@pytest.mark.parametrize("kind", ["dense", "gated"])
def test_chunked_qk_equals_unchunked(kind):
    _, lrm = replacement(kind)
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 20)
    loadings = head_loadings(lrm, graph, targets, sources, AttentionAttributionConfig(head_min_share=0.02))
    config = AttentionAttributionConfig(qk_top_pairs=6, qk_top_marginals=4)
    whole = qk_attribution(lrm, loadings, config, chunks=QKChunks(10**6, 10**6, 10**6))
    assert whole.groupby(["layer", "query_pos"]).ngroups > 3
    assert whole.groupby(["layer", "head", "query_pos", "key_pos"]).ngroups > 10
    text = ["layer", "head", "query_pos", "key_pos", "kind", "query_component", "key_component"]
    for chunks in (QKChunks(2, 1, 1), QKChunks(3, 4, 2), QKChunks(8, 2, 100)):
        chunked = qk_attribution(lrm, loadings, config, chunks=chunks)
        assert chunked[text].values.tolist() == whole[text].values.tolist()
        for column in ("value", "gate_logit"):
            assert (chunked[column] - whole[column]).abs().max() <= 1e-6 * whole[column].abs().max()
    with pytest.raises(MemoryBudgetError, match="QK attribution of a"):
        qk_attribution(lrm, loadings, config, memory_budget=1000)


def test_rows_of_one_edge_match_its_pair_grid():
    _, lrm = replacement("gated")
    components = ResidualComponents(lrm)
    config = AttentionAttributionConfig(qk_top_pairs=7, qk_top_marginals=3)
    layer, head, query, key = 2, 3, lrm.n_pos - 1, 2
    query_ids, key_ids, pairs = qk_pair_contributions(components, layer, head, query, key)
    rows = pd.DataFrame(qk_rows(components, layer, head, query, key, config), columns=QK_COLUMNS)
    top = rows[rows["kind"] == "pair"]
    expected = pairs.flatten().abs().topk(7).indices.tolist()
    assert [(query_ids[i // len(key_ids)], key_ids[i % len(key_ids)]) for i in expected] == \
        list(zip(top["query_component"], top["key_component"]))
    assert torch.allclose(torch.tensor(top["value"].values), pairs.flatten()[expected].double(), rtol=1e-6, atol=1e-7)
    marginal = pairs.double().sum(0)  # per key component
    keys = rows[rows["kind"] == "key_marginal"]
    assert keys["key_component"].tolist() == [key_ids[i] for i in marginal.abs().topk(3).indices.tolist()]


def test_main_pairs_on_edge_windows_equal_the_whole_grid():
    """Each (edge, head) grid formed only on [source pos, target pos] gives the first largest |pair| of the
    whole (query, key) grid, ties and all-zero grids included, at every batch size."""
    from types import SimpleNamespace

    from attribution.heads import _main_pairs

    generator = torch.Generator().manual_seed(0)
    n_heads, n_kv, n_pos, head_dim, n_entries, start = 4, 2, 23, 5, 60, 3
    patterns = torch.rand(1, n_heads, n_pos + start, n_pos + start, generator=generator).tril()
    patterns[patterns < 0.3] = 0  # closed gates
    lrm = SimpleNamespace(model=SimpleNamespace(n_heads=n_heads, n_kv_heads=n_kv),
                          prompt=SimpleNamespace(patterns=patterns))
    source_pos = torch.randint(start, start + n_pos, (n_entries,), generator=generator)
    target_pos = source_pos + (torch.rand(n_entries, generator=generator) * (start + n_pos - source_pos)).long()
    z = torch.randn(n_heads, n_entries, n_pos, head_dim, generator=generator).round()  # integers: ties
    values = torch.randn(n_kv, n_entries, n_pos, head_dim, generator=generator).round()
    relative = torch.arange(n_pos) + start
    z[:, relative[None, :] > target_pos[:, None]] = 0  # nothing after the target reaches it
    values[:, relative[None, :] < source_pos[:, None]] = 0  # the source writes nothing before its position
    head = torch.randint(0, n_heads, (n_entries,), generator=generator)
    z[head[0], 0] = 0  # an all-zero grid
    rows = torch.arange(n_entries)
    grids = torch.einsum("bqe,bke->bqk", z[head, rows], values[head // 2, rows])
    grids = grids * patterns[0, head][:, start:, start:]
    flat = grids.flatten(1).abs().argmax(1)
    part = grids.flatten(1).sum(1) + 1
    assert (grids.flatten(1).abs() == grids.flatten(1).abs().amax(1, keepdim=True)).sum(1).max() > 1  # ties
    for max_pairs in (1, 2, 1000):
        query, key, share = _main_pairs(lrm, 0, z, values, rows, rows, head, part, source_pos, target_pos, start,
                                        max_pairs)
        assert query.tolist() == (flat // n_pos + start).tolist() and key.tolist() == (flat % n_pos + start).tolist()
        assert torch.equal(share, grids.flatten(1).gather(1, flat[:, None])[:, 0] / part)
