"""The searches for each head's main (query, key) pair (`heads._main_pairs`: the bounded search on windows wider
than FULL_WIDTH, the open cells alone on mostly closed gated windows) against forming every cell of the grid: the
same query and key, the same share bit for bit (a zero share's sign aside), on synthetic grids (dense, gated,
closed gates, ties, all-zero) and in head loadings of the tiny model."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from attribution import heads
from attribution.config import AttentionAttributionConfig, GraphConfig
from attribution.graph import attribute
from attribution.prune import prune
from attribution.stage import kept_edges
from tests.test_attribution import replacement


def whole_grid_pairs(lrm, layer, z, values, target_row, source_row, head, part, source_pos, target_pos, start,
                     max_pairs):
    """The reference: every (query, key) cell of each entry's window formed, as `_main_pairs` did before the
    bounded search (same batches, same bmm shapes)."""
    group = lrm.model.n_heads // lrm.model.n_kv_heads
    n_pos, head_dim = z.shape[2], z.shape[3]
    patterns = lrm.prompt.patterns[layer, :, start:start + n_pos, start:start + n_pos]
    kv_head = torch.div(head, group, rounding_mode="floor")
    low, width = source_pos - start, target_pos - source_pos + 1

    def grid_bytes(n: int, w: int) -> int:
        return n * w * (3 * w + 3 * head_dim) * 4

    max_bytes = max_pairs * grid_bytes(1, n_pos)
    query, key = torch.empty(len(head), dtype=torch.long), torch.empty(len(head), dtype=torch.long)
    share = torch.empty(len(head))
    bucket = torch.ceil(2 * torch.log2(width.double())).long()
    for level in bucket.unique().tolist():
        entries = (bucket == level).nonzero().flatten()
        w = int(width[entries].max())
        for rows in entries.split(max(1, max_bytes // grid_bytes(1, w))):
            offset = low[rows].clamp(max=n_pos - w)
            z_rows = z.unfold(2, w, 1)[head[rows], target_row[rows], offset]
            value_rows = values.unfold(2, w, 1)[kv_head[rows], source_row[rows], offset]
            pair = torch.bmm(z_rows.mT, value_rows)
            pair = pair.mul_(patterns.unfold(1, w, 1).unfold(2, w, 1)[head[rows], offset, offset])
            q, k, value = heads._first_largest(pair)
            found = value != 0
            offset = torch.where(found, offset, 0)
            query[rows] = torch.where(found, q, 0) + offset + start
            key[rows] = torch.where(found, k, 0) + offset + start
            share[rows] = value / part[rows]
    return query, key, share


def synthetic(seed: int, n_pos: int = 150, start: int = 5, head_dim: int = 16, n_entries: int = 120,
              gated: bool = False, integers: bool = False):
    """A layer's patterns (softmax rows, optionally with closed gates and one closed head), z and values
    zero outside each entry's [source, target] window, entries of every width."""
    generator = torch.Generator().manual_seed(seed)
    n_heads, n_kv, total = 4, 2, n_pos + start
    scores = torch.randn(1, n_heads, total, total, generator=generator) * 3
    patterns = scores.masked_fill(torch.ones(total, total, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    if gated:
        patterns = patterns * (torch.rand(patterns.shape, generator=generator) < 0.1)
        patterns[0, 3] = 0  # a head whose gates are all shut
    lrm = SimpleNamespace(model=SimpleNamespace(n_heads=n_heads, n_kv_heads=n_kv),
                          prompt=SimpleNamespace(patterns=patterns))
    source_pos = torch.randint(start, total, (n_entries,), generator=generator)
    source_pos[: n_entries // 2] = torch.randint(start, start + 8, (n_entries // 2,), generator=generator)  # wide
    target_pos = source_pos + (torch.rand(n_entries, generator=generator) * (total - source_pos)).long()
    target_pos[: n_entries // 4] = total - 1  # whole-prompt windows
    z = torch.randn(n_heads, n_entries, n_pos, head_dim, generator=generator)
    values = torch.randn(n_kv, n_entries, n_pos, head_dim, generator=generator)
    if integers:  # few distinct values: many exact ties
        z, values = z.round(), values.round()
        patterns.mul_(4).round_().div_(4)
    relative = torch.arange(n_pos) + start
    z[:, relative[None, :] > target_pos[:, None]] = 0
    values[:, relative[None, :] < source_pos[:, None]] = 0
    head = torch.randint(0, n_heads, (n_entries,), generator=generator)
    z[head[0], 0] = 0  # an all-zero grid
    rows = torch.arange(n_entries)
    part = torch.randn(n_entries, generator=generator)
    return lrm, (z, values, rows, rows, head, part, source_pos, target_pos, start)


def assert_same_pairs(found, expected, exact: bool = True) -> None:
    """Same pairs; the same shares bit for bit, or (`exact` False: cells formed alone round differently from a
    bmm's) to float32 rounding."""
    assert torch.equal(found[0], expected[0]) and torch.equal(found[1], expected[1])
    if exact:
        assert torch.equal(found[2], expected[2])
    else:
        torch.testing.assert_close(found[2], expected[2], rtol=1e-5, atol=0)
    nonzero = expected[2] != 0
    assert torch.equal(found[2][nonzero].signbit(), expected[2][nonzero].signbit())


@pytest.mark.parametrize("gated, integers, first_rows, head_dim, open_cells", [
    (False, False, 16, 16, False), (True, False, 16, 16, False), (False, True, 16, 16, False),
    (True, True, 16, 16, False), (False, False, 10**6, 16, False), (False, False, 16, 64, False),
    (True, False, 16, 16, True), (True, True, 16, 16, True), (True, False, 16, 64, True)])
def test_searches_equal_whole_grid(gated, integers, first_rows, head_dim, open_cells, monkeypatch):
    monkeypatch.setattr(heads, "FIRST_ROWS", first_rows)  # 10**6: every wide grid formed whole at once
    monkeypatch.setattr(heads, "BOUNDED_MAX_HEAD_DIM", 64)  # the search also for SmolLM2-wide heads
    if not open_cells:
        monkeypatch.setattr(heads, "OPEN_CELL_COST", 10**6)  # never form cells alone
    taken = []
    first_largest = heads.OpenCells.first_largest
    monkeypatch.setattr(heads.OpenCells, "first_largest", lambda self, *a: taken.append(len(a[2])) or
                        first_largest(self, *a))
    lrm, arguments = synthetic(seed=int(gated) + 2 * int(integers), gated=gated, integers=integers,
                               head_dim=head_dim)
    source_pos, target_pos = arguments[6], arguments[7]
    assert int((target_pos - source_pos + 1).max()) > 4 * heads.FULL_WIDTH  # wide windows take the bound path
    for max_pairs in (1, 7, 1000):  # 1: a piece of open cells holds one entry
        expected = whole_grid_pairs(lrm, 0, *arguments, max_pairs)
        found = heads._main_pairs(lrm, 0, *arguments, max_pairs)
        assert_same_pairs(found, expected, exact=integers or not open_cells)  # integers: every product exact
    assert (sum(taken) > len(arguments[0][0]) // 2) if open_cells else not taken  # most entries by open cells
    if integers:  # the ties are real: some grids hold their largest |pair| more than once
        z, values, _, _, head = arguments[:5]
        grids = torch.einsum("bqe,bke->bqk", z[head, arguments[2]], values[head // 2, arguments[2]])
        grids = grids * lrm.prompt.patterns[0, head][:, 5:, 5:]
        flat = grids.flatten(1).abs()
        assert (flat == flat.amax(1, keepdim=True)).logical_and(flat > 0).sum(1).max() > 1


def test_bound_search_takes_more_rows_until_settled():
    """The rows of highest bound hold 6 (bound sqrt(136)); the largest |pair|, 8, lies in rows whose bound it
    attains exactly: the search must go on past its first rows, and the first such row, column 0, is the answer."""
    n_pos, first_rows = 64, heads.FIRST_ROWS
    patterns = torch.ones(1, 1, n_pos, n_pos).tril()
    lrm = SimpleNamespace(model=SimpleNamespace(n_heads=1, n_kv_heads=1), prompt=SimpleNamespace(patterns=patterns))
    z = torch.zeros(1, 1, n_pos, 2)
    z[0, 0, :first_rows] = torch.tensor([6.0, 10.0])
    z[0, 0, first_rows:] = torch.tensor([8.0, 0.0])
    values = torch.zeros(1, 1, n_pos, 2)
    values[..., 0] = 1.0
    index, ends = torch.zeros(1, dtype=torch.long), (torch.tensor([0]), torch.tensor([n_pos - 1]))
    query, key, share = heads._main_pairs(lrm, 0, z, values, index, index, index, torch.ones(1), *ends, 0, 10)
    assert (query.item(), key.item(), share.item()) == (first_rows, 0, 8.0)


def test_open_cells_search_only_the_window_and_name_its_start_when_all_zero(monkeypatch):
    """Open cells before the source (keys) or after the target (queries) are left out though their pairs are
    larger; an entry whose open cells in the window all give zero names the block's start, share 0."""
    n_pos, start = 8, 3
    patterns = torch.zeros(1, 1, n_pos, n_pos)
    patterns[0, 0, 2, 0] = patterns[0, 0, 7, 3] = patterns[0, 0, 4, 2] = patterns[0, 0, 5, 4] = 1.0
    lrm = SimpleNamespace(model=SimpleNamespace(n_heads=1, n_kv_heads=1), prompt=SimpleNamespace(patterns=patterns))
    z, values = torch.ones(1, 2, n_pos - start, 1), torch.ones(1, 2, n_pos - start, 1)
    z[0, :, 0] = values[0, :, 0] = 100.0  # position 3: only key 3 of query 7 (after entry 0's target) uses it
    z[0, 1] = 0  # entry 1: every cell zero
    index = torch.tensor([0, 1])
    monkeypatch.setattr(heads, "OPEN_CELL_COST", 1)  # 2 of the window's 15 causal cells open: few enough
    query, key, share = heads._main_pairs(lrm, 0, z, values, index, index, torch.zeros(2, dtype=torch.long),
                                          torch.tensor([2.0, 3.0]), torch.tensor([4, 3]), torch.tensor([6, 7]), start,
                                          10)
    assert query.tolist() == [5, 3] and key.tolist() == [4, 3] and share.tolist() == [0.5, 0.0]


@pytest.mark.parametrize("kind, skip, open_cells", [("dense", False, False), ("gated", False, False),
                                                     ("gated", True, False), ("gated", True, True)])
def test_head_loadings_equal_whole_grid_search(kind, skip, open_cells, monkeypatch):
    if open_cells:  # every window's open cells formed alone, though the tiny model's gates are not that sparse
        monkeypatch.setattr(heads, "OPEN_CELL_COST", 1)
    _, lrm = replacement(kind, prompt="The cat sat on the mat. " * 4, skip=skip)
    graph = attribute(lrm, GraphConfig(max_feature_nodes=64))
    pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos, row_nodes=graph.row_nodes)
    targets, sources, _ = kept_edges(graph, pruned)
    config = AttentionAttributionConfig(layer_min_share=0.0, head_min_share=0.05)
    found = heads.head_loadings(lrm, graph, targets, sources, config, chunks=heads.HeadChunks(8, 16, 5))
    pairs = found[found["head"] >= 0]
    assert ((pairs["query_pos"] - pairs["key_pos"]).abs() > heads.FULL_WIDTH).any() and len(pairs) > 100
    monkeypatch.setattr(heads, "_main_pairs", whole_grid_pairs)
    expected = heads.head_loadings(lrm, graph, targets, sources, config, chunks=heads.HeadChunks(8, 16, 5))
    pd.testing.assert_frame_equal(found, expected, check_exact=not open_cells, rtol=1e-5, atol=0)
