"""The Parquet store: exact round trips, atomic commits, clear errors, and the query API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from attribution.config import GraphConfig
from attribution.graph import attribute
from attribution.prune import prune
from attribution.records import (
    GraphRecord,
    edges_table,
    empty_table,
    graphs_table,
    make_graph_id,
    nodes_table,
)
from attribution.schema import DATA_TABLES, ROW_COUNTS, TABLES, tagged
from attribution.store import PID_SPACE, GraphNotFoundError, GraphStore, StoreError, open_store
from attribution.store.files import StoreFiles
from attribution.store.reader import StoreReader
from bench.store_scale import synthetic_record
from tests.test_attribution import replacement


def make_record(kind: str = "gated", prompt: str = "The cat sat on", edges: str = "pruned"):
    _, lrm = replacement(kind, prompt=prompt)
    graph = attribute(lrm, GraphConfig(), prompt=prompt)
    pruned = prune(graph.adjacency, graph.logit_probs, graph.n_selected, graph.n_pos)
    settings = json.dumps({"edges": edges})
    graph_id = make_graph_id(kind, "tiny", "random", prompt, settings)
    tables = {
        "graphs": graphs_table(graph_id, kind, graph, pruned, token_strings=[chr(t) if t < 128 else "?"
                               for t in graph.tokens.tolist()], model="tiny", clt="random", settings=settings,
                               edges_stored=edges, seconds=0.1),
        "nodes": nodes_table(graph_id, graph, pruned),
        "edges": edges_table(graph_id, graph, pruned, edges),
        "head_loadings": empty_table("head_loadings"),
        "qk_pairs": empty_table("qk_pairs"),
    }
    return graph, pruned, GraphRecord(graph_id, kind, tables)


def test_round_trip_is_exact(tmp_path):
    graph, pruned, record = make_record(edges="all")
    store = open_store(tmp_path / "graphs")
    store.write(record)
    loaded = store.load_graph(record.graph_id)
    pd.testing.assert_frame_equal(loaded.nodes, record.tables["nodes"].to_pandas())
    pd.testing.assert_frame_equal(loaded.edges, record.tables["edges"].to_pandas())
    info = record.tables["graphs"].to_pandas().iloc[0]
    assert loaded.info["prompt"] == graph.prompt and list(loaded.info["tokens"]) == graph.tokens.tolist()
    assert loaded.info["completeness_score"] == info["completeness_score"]
    adjacency = torch.zeros_like(graph.adjacency)
    adjacency[torch.tensor(loaded.edges["target"].to_numpy()), torch.tensor(loaded.edges["source"].to_numpy())] = torch.tensor(
        loaded.edges["weight"].to_numpy())
    assert torch.equal(adjacency, graph.adjacency)  # every nonzero edge, bit for bit
    assert loaded.edges["kept"].sum() == int((pruned.edge_mask & (graph.adjacency != 0)).sum())
    kept = loaded.edges[loaded.edges["kept"]]
    by_size = kept.loc[kept["weight"].abs().sort_values(ascending=False, kind="stable").index]
    assert store.top_edges(record.graph_id, k=25)["weight"].tolist() == by_size["weight"][:25].tolist()
    everything = loaded.edges["weight"].abs().sort_values(ascending=False, kind="stable")
    top = store.top_edges(record.graph_id, k=25, kept_only=False)
    assert top["weight"].abs().tolist() == everything[:25].tolist()


def test_pruned_store_keeps_only_kept_edges_and_top_edges_are_sorted(tmp_path):
    graph, pruned, record = make_record(edges="pruned")
    store = open_store(f"file://{tmp_path}/graphs")
    store.write(record)
    edges = store.read_table("edges", record.graph_id)
    assert edges["kept"].all() and (edges["weight"] != 0).all()
    assert len(edges) == int((pruned.edge_mask & (graph.adjacency != 0)).sum())
    top = store.top_edges(record.graph_id, k=10)
    expected = edges.reindex(edges["weight"].abs().sort_values(ascending=False, kind="stable").index)[:10]
    assert top["weight"].tolist() == expected["weight"].tolist()
    ids = graph.node_ids()
    assert top["target_id"].tolist() == [ids[i] for i in top["target"]]
    into = store.edges_into(record.graph_id, top["target_id"][0])
    assert (into["target"] == top["target"][0]).all() and len(into) >= 1
    out = store.edges_out_of(record.graph_id, int(top["source"][0]))
    assert (out["source"] == top["source"][0]).all()


def test_list_and_variants(tmp_path):
    store = open_store(tmp_path)
    for kind, prompt in [("dense", "ab cd"), ("gated", "ab cd"), ("gated", "xy zw")]:
        store.write(make_record(kind, prompt)[2])
    assert store.variants() == ["dense", "gated"]
    assert len(store.list_graphs()) == 3 and set(store.list_graphs("gated")["prompt"]) == {"ab cd", "xy zw"}
    assert len(store.list_graphs("missing")) == 0
    rewritten = make_record("gated", "xy zw")[2]
    store.write(rewritten)  # same id: replaced, not duplicated
    assert len(store.list_graphs()) == 3


def test_interrupted_write_leaves_no_visible_graph(tmp_path, monkeypatch):
    store = open_store(tmp_path)
    _, _, record = make_record()
    original = StoreFiles.write_file

    def dies_at_commit(self, name, table, path):
        if name == "graphs":
            raise KeyboardInterrupt
        original(self, name, table, path)

    monkeypatch.setattr(StoreFiles, "write_file", dies_at_commit)
    with pytest.raises(KeyboardInterrupt):
        store.write(record)
    monkeypatch.undo()
    assert len(open_store(tmp_path).list_graphs()) == 0
    with pytest.raises(GraphNotFoundError):
        open_store(tmp_path).load_graph(record.graph_id)
    assert not list(tmp_path.rglob("*.tmp-*"))
    store.write(record)  # a rerun completes it
    assert open_store(tmp_path).list_graphs()["graph_id"].tolist() == [record.graph_id]


def test_first_write_removes_only_stale_temporary_files(tmp_path):
    """Killed writers' temporary files go on a variant's first write: those over an hour old, and those of an
    exited process of this pid space. A live writer's stay, and so does a fresh one from another pid space
    (its pid cannot be checked here)."""
    _, _, record = make_record()
    folder = tmp_path / "edges" / f"variant={record.variant}"
    other_variant = tmp_path / "edges" / "variant=other"
    folder.mkdir(parents=True)
    other_variant.mkdir(parents=True)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    elsewhere = "f" * 12
    assert elsewhere != PID_SPACE
    token = "0123456789abcdef" * 2
    old = {folder / f"a.parquet.tmp-{token}", folder / f"b.parquet.tmp-{elsewhere}-{os.getpid()}-{token}"}
    removed = old | {folder / f"c.parquet.tmp-{PID_SPACE}-{exited.pid}-{token}"}  # its writer exited
    kept = {
        folder / f"d.parquet.tmp-{PID_SPACE}-{os.getpid()}-{token}",  # a live writer's
        folder / f"e.parquet.tmp-{elsewhere}-{exited.pid}-{token}",  # another pid space's, fresh
        folder / f"f.parquet.tmp-{token}",  # fresh, writer unknown
        folder / "g.parquet.tmp-not-ours",
        folder / "h.parquet",
        other_variant / f"i.parquet.tmp-{token}",  # old, but nobody writes this variant yet
    }
    for path in removed | kept:
        path.write_bytes(b"")
    an_hour_ago = time.time() - 3601
    for path in old | {other_variant / f"i.parquet.tmp-{token}"}:
        os.utime(path, (an_hour_ago, an_hour_ago))
    store = open_store(tmp_path)
    store.write(record)
    assert {p for p in tmp_path.rglob("*") if p.is_file()} - (removed | kept) == {
        tmp_path / table / f"variant={record.variant}" / f"{record.graph_id}.parquet" for table in record.tables}
    assert not any(p.exists() for p in removed) and all(p.exists() for p in kept)
    assert store.remove_stale_temporaries("other") == [str(other_variant / f"i.parquet.tmp-{token}")]


def test_clear_errors(tmp_path):
    store = open_store(tmp_path)
    _, _, record = make_record()
    store.write(record)
    with pytest.raises(GraphNotFoundError, match="not in the store"):
        store.load_graph("0123456789abcdef")
    edges_path = tmp_path / "edges" / f"variant={record.variant}" / f"{record.graph_id}.parquet"
    edges_path.write_bytes(b"not parquet at all")
    with pytest.raises(StoreError, match="corrupted or not a Parquet file"):
        store.top_edges(record.graph_id)
    pq.write_table(pa.table({"x": [1, 2]}), edges_path)
    with pytest.raises(StoreError, match="not an attribution-store file"):
        store.load_graph(record.graph_id)
    with pytest.raises(StoreError, match="variant"):
        store.list_graphs("../etc")
    with pytest.raises(StoreError, match="no node"):
        store.edges_into(record.graph_id, "99_99_99")


def test_failures_round_trip_and_refuse_bad_ids(tmp_path):
    from attribution.records import failure_table
    from attribution.replacement import PromptTooLongError

    store = open_store(tmp_path)
    assert store.failures().empty and list(store.failures().columns)[:3] == ["failure_id", "variant", "prompt"]
    error = PromptTooLongError("prompt of 40 tokens exceeds the context of 24")
    store.write_failure("sparse", "abc123", failure_table("abc123", "sparse", "x" * 40, "ioi", 5, error))
    assert store.has_failure("sparse", "abc123") and not store.has_failure("dense", "abc123")
    row = store.failures().iloc[0]
    assert (row["prompt"], row["task"], row["prompt_index"], row["error_type"]) == ("x" * 40, "ioi", 5,
                                                                                     "PromptTooLongError")
    assert row["message"] == str(error) and store.list_graphs().empty  # a failure is no graph
    with pytest.raises(StoreError, match="failure id"):
        store.write_failure("sparse", "../x", failure_table("../x", "sparse", "", "custom", 0, error))
    store.delete_failure("sparse", "abc123")
    store.delete_failure("sparse", "abc123")  # absent is fine
    assert store.failures("sparse").empty


# -- safe ids, integrity, temporaries, datasets, compaction ----------------------------------------------------

def synthetic_store(root, counts: dict[str, int]) -> GraphStore:
    """A store of small random graphs (every table filled): counts[variant] graphs per variant."""
    store = open_store(root)
    seed = 0
    for variant, n in counts.items():
        for _ in range(n):
            store.write(synthetic_record(f"{variant}{seed:04d}", variant, seed))
            seed += 1
    return store


def everything(store: GraphStore) -> dict:
    """Every graph's every table (and its top edges), the listing, and each table's dataset, for exact
    comparison."""
    listing = store.list_graphs()
    graphs = {}
    for graph_id in listing["graph_id"]:
        loaded = store.load_graph(graph_id)
        graphs[graph_id] = {"info": loaded.info, "nodes": loaded.nodes, "edges": loaded.edges,
                            "head_loadings": loaded.head_loadings, "qk_pairs": loaded.qk_pairs,
                            "top": store.top_edges(graph_id, k=7), "all_top": store.top_edges(graph_id, k=7,
                                                                                                kept_only=False)}
    datasets = {t: dataset_rows(store, t) for t in TABLES}
    return {"listing": listing, "graphs": graphs, "datasets": datasets}


def dataset_rows(store: GraphStore, table: str) -> pd.DataFrame:
    """A table's dataset as a DataFrame in a canonical row order (graph by graph, each in stored order)."""
    frame = store.dataset(table).to_table().to_pandas().drop(columns=["pack"])
    frame["row"] = frame.groupby("graph_id").cumcount()
    return frame.sort_values(["graph_id", "row"]).reset_index(drop=True)


def assert_same(got: dict, want: dict) -> None:
    pd.testing.assert_frame_equal(got["listing"], want["listing"])
    assert got["graphs"].keys() == want["graphs"].keys()
    for graph_id, tables in want["graphs"].items():
        for name, frame in tables.items():
            if name == "info":
                pd.testing.assert_series_equal(got["graphs"][graph_id][name], frame)
            else:
                pd.testing.assert_frame_equal(got["graphs"][graph_id][name], frame)
    for table, frame in want["datasets"].items():
        pd.testing.assert_frame_equal(got["datasets"][table], frame)


def assert_each_graph_once(store: GraphStore, expected: dict[str, dict[str, int]]) -> None:
    """Listing, has_graph and every dataset show each expected graph once, with its rows (expected:
    graph_id -> table -> rows)."""
    listing = store.list_graphs()
    assert sorted(listing["graph_id"]) == sorted(expected)
    for table in DATA_TABLES:
        rows = store.dataset(table).to_table(columns=["graph_id"])["graph_id"].to_pandas().value_counts()
        assert {g: int(rows.get(g, 0)) for g in expected} == {g: n[table] for g, n in expected.items()}
        assert set(rows.index) <= set(expected)
    for graph_id, counts in expected.items():
        assert {t: len(store.read_table(t, graph_id)) for t in DATA_TABLES} == counts


def row_counts(store: GraphStore) -> dict[str, dict[str, int]]:
    return {g: {t: len(store.read_table(t, g)) for t in DATA_TABLES} for g in store.list_graphs()["graph_id"]}


BAD_IDS = ["../../../victim", "..", ".", "a/b", "a\\b", "", "x" * 129, ".hidden", "_x", "a b", "a.b", None, 7]


def test_bad_ids_and_variants_are_refused_before_any_path(tmp_path):
    """Every public entry point refuses a traversal (or otherwise unsafe) id or variant with one StoreError,
    and nothing outside the store is touched."""
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"precious")
    store = synthetic_store(tmp_path / "store", {"dense": 1})
    good = store.list_graphs()["graph_id"][0]
    record = synthetic_record(good, "dense", 0)
    files = sorted(p for p in tmp_path.rglob("*"))
    by_id = [
        lambda bad: store.write(synthetic_record(bad, "dense", 1) if isinstance(bad, str) else
                                GraphRecord(bad, "dense", record.tables)),
        lambda bad: store.write_failure("dense", bad, record.tables["graphs"]),
        lambda bad: store.has_graph("dense", bad), lambda bad: store.has_failure("dense", bad),
        lambda bad: store.delete(bad), lambda bad: store.delete(bad, missing_ok=True),
        lambda bad: store.delete_failure("dense", bad), lambda bad: store.load_graph(bad),
        lambda bad: store.read_table("nodes", bad), lambda bad: store.graph_info(bad),
        lambda bad: store.top_edges(bad), lambda bad: store.variant_of(bad), lambda bad: store.edges_into(bad, 0),
        lambda bad: store.edges_out_of(bad, 0), lambda bad: store.heads_for_edge(bad, 0, 1),
        lambda bad: store.qk_pairs(bad, 0, 0, 0, 0), lambda bad: store.qk_pairs_for_edge(bad, 0, 1),
        lambda bad: store.path("nodes", "dense", bad),
    ]
    by_variant = [
        lambda bad: store.write(GraphRecord(good, bad, record.tables)),
        lambda bad: store.write_failure(bad, good, record.tables["graphs"]),
        lambda bad: store.has_graph(bad, good), lambda bad: store.has_failure(bad, good),
        lambda bad: store.delete_failure(bad, good), lambda bad: store.compact(bad),
        lambda bad: store.remove_stale_temporaries(bad), lambda bad: store.path("nodes", bad, good),
    ]
    by_variant_or_all = [  # variant None: every variant
        lambda bad: store.list_graphs(bad), lambda bad: store.failures(bad), lambda bad: store.dataset("nodes", bad),
    ]
    for bad in BAD_IDS:
        calls = by_id + (by_variant if bad != "a.b" else []) + (by_variant_or_all if bad not in ("a.b", None) else [])
        for call in calls:  # "a.b" is a fine variant, no fine id
            with pytest.raises(StoreError, match="must be 1-128") as raised:
                call(bad)
            assert not isinstance(raised.value, GraphNotFoundError)
    for bad_table in ["../../victim", "failures"]:
        with pytest.raises(StoreError, match="unknown table"):
            store.read_table(bad_table, good)
        with pytest.raises(StoreError, match="unknown table"):
            store.dataset(bad_table)
    assert victim.read_bytes() == b"precious"
    assert sorted(p for p in tmp_path.rglob("*")) == files  # nothing written, nothing removed


def test_commit_row_records_row_counts_and_a_record_of_mixed_graphs_is_refused(tmp_path):
    store = synthetic_store(tmp_path, {"dense": 2})
    listing = store.list_graphs()
    for info in listing.itertuples():
        for table in DATA_TABLES:
            assert getattr(info, ROW_COUNTS[table]) == len(store.read_table(table, info.graph_id)) > 0
    first, second = (synthetic_record(g, "dense", i) for i, g in enumerate(listing["graph_id"]))
    mixed = GraphRecord(first.graph_id, "dense", {**first.tables, "edges": second.tables["edges"]})
    with pytest.raises(StoreError, match=f"graph {first.graph_id}: its edges table holds rows of graph {second.graph_id}"):
        store.write(mixed)
    assert_each_graph_once(store, row_counts(store))


def test_a_file_swapped_with_another_graphs_is_refused(tmp_path):
    """A nodes file replaced by another graph's (other row count, or same count and other ids) is refused
    with the graph and table named, by every reader."""
    store = synthetic_store(tmp_path, {"dense": 2})
    one, other = store.list_graphs()["graph_id"]
    nodes = tmp_path / "nodes" / "variant=dense"
    (nodes / f"{one}.parquet").write_bytes((nodes / f"{other}.parquet").read_bytes())
    assert len(store.read_table("nodes", other)) != store.graph_info(one)["rows_nodes"]
    for read in (lambda: store.load_graph(one), lambda: store.read_table("nodes", one),
                 lambda: store.top_edges(one), lambda: store.edges_into(one, 0), lambda: store.compact("dense")):
        with pytest.raises(StoreError, match=f"graph {one}: its nodes file .* rows, its graphs row says"):
            read()
    own = synthetic_record(one, "dense", 0).tables["nodes"]  # right length, another graph's ids
    pq.write_table(own.set_column(0, "graph_id", pa.array([other] * len(own))).cast(tagged("nodes")),
                   nodes / f"{one}.parquet")
    with pytest.raises(StoreError, match=f"graph {one}: its nodes file .* holds rows of graph {other}"):
        store.load_graph(one)
    store.write(synthetic_record(one, "dense", 0))
    assert len(store.load_graph(one).nodes) == len(own)


def test_a_pack_swapped_with_another_variants_is_refused(tmp_path):
    store = synthetic_store(tmp_path, {"dense": 3, "sparse": 3})
    for variant in ("dense", "sparse"):
        store.compact(variant)
    dense, sparse = ([*(tmp_path / "nodes" / f"variant={v}" / "packs").glob("*.parquet")][0] for v in ("dense", "sparse"))
    dense.write_bytes(sparse.read_bytes())
    graph_id = store.list_graphs("dense")["graph_id"][0]
    with pytest.raises(StoreError, match="nodes"):
        open_store(tmp_path).load_graph(graph_id)
    assert len(open_store(tmp_path).load_graph(store.list_graphs("sparse")["graph_id"][0]).nodes)


def test_a_store_of_an_older_schema_is_refused_with_what_to_do(tmp_path):
    store = synthetic_store(tmp_path, {"dense": 1})
    graph_id = store.list_graphs()["graph_id"][0]
    path = tmp_path / "graphs" / "variant=dense" / f"{graph_id}.parquet"
    old = pq.read_table(path).drop_columns(list(ROW_COUNTS.values()))
    pq.write_table(old.replace_schema_metadata({b"sparse_attention_interp.attribution": b"graphs:2"}), path)
    with pytest.raises(StoreError, match="older attribution store .* --force attribution"):
        open_store(tmp_path).list_graphs()


def test_a_killed_writers_temporary_file_does_not_break_directory_scans(tmp_path):
    """A temporary file left by a killed writer (named as the store names it) is skipped by pandas' and
    pyarrow's directory discovery, and swept once its writer is known to have exited."""
    store = synthetic_store(tmp_path, {"dense": 2, "sparse": 1})
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    assert Path(store._files.temporary(store.path("edges", "dense", "lost"))).name.startswith(".lost.parquet.tmp-")
    left = tmp_path / "edges" / "variant=dense" / f".lost.parquet.tmp-{PID_SPACE}-{exited.pid}-{'0' * 32}"
    left.write_bytes(b"PAR1 half a file")
    expected = sum(row_counts(store)[g]["edges"] for g in store.list_graphs()["graph_id"])
    assert len(pd.read_parquet(tmp_path / "edges")) == expected
    assert ds.dataset(tmp_path / "edges", partitioning="hive").count_rows() == expected
    packs = tmp_path / "edges" / "variant=dense" / "packs"
    packs.mkdir()
    in_pack = packs / f".00000001-{'a' * 12}.parquet.tmp-{PID_SPACE}-{exited.pid}-{'1' * 32}"
    in_pack.write_bytes(b"")
    live = tmp_path / "nodes" / "variant=dense" / f".x.parquet.tmp-{PID_SPACE}-{os.getpid()}-{'2' * 32}"
    live.write_bytes(b"")
    assert open_store(tmp_path).remove_stale_temporaries("dense") == sorted([str(left), str(in_pack)])
    assert live.exists()


def test_dataset_holds_committed_graphs_only(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path, {"dense": 2, "sparse": 1})
    expected = row_counts(store)
    original = StoreFiles.write_file

    def dies_at_commit(self, name, table, path):
        if name == "graphs":
            raise KeyboardInterrupt
        original(self, name, table, path)

    monkeypatch.setattr(StoreFiles, "write_file", dies_at_commit)
    with pytest.raises(KeyboardInterrupt):
        store.write(synthetic_record("uncommitted", "dense", 99))
    monkeypatch.undo()
    assert "uncommitted" in set(pd.read_parquet(tmp_path / "nodes")["graph_id"])  # a direct scan sees it
    assert_each_graph_once(store, expected)  # the dataset does not
    nodes = store.dataset("nodes", "dense").to_table().to_pandas()
    assert set(nodes["variant"]) == {"dense"} and set(nodes["pack"]) == {""}
    for graph_id, frame in nodes.groupby("graph_id"):
        pd.testing.assert_frame_equal(frame.drop(columns=["variant", "pack"]).reset_index(drop=True),
                                      store.read_table("nodes", graph_id))
    assert store.dataset("edges", "missing").count_rows() == 0 and open_store(tmp_path / "empty").dataset(
        "graphs").count_rows() == 0


def readme_recipes() -> dict[str, str]:
    """The README's cross-graph query recipes: each ```python block after a '<!-- recipe: NAME -->' line."""
    text = (Path(__file__).resolve().parent.parent / "attribution" / "README.md").read_text()
    return dict(re.findall(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", text, flags=re.S))


@pytest.mark.parametrize("engine", ["pyarrow", "duckdb", "polars"])
def test_readme_query_recipes_run(tmp_path, engine):
    """The documented recipes, run as written on a store with per-graph files and a pack, a rewritten and a
    deleted packed graph: every graph where head L5H3 carries an edge, edges per graph, top edges overall."""
    if engine != "pyarrow":
        pytest.importorskip(engine)
    store = synthetic_store(tmp_path, {"dense": 6, "sparse": 4})
    store.compact("dense")
    store.write(synthetic_record("dense0001", "dense", 50))  # rewritten after packing
    store.delete("dense0002")
    store.write(synthetic_record("late", "sparse", 51))
    recipe = readme_recipes()[engine]
    scope = {"store": store}
    exec(recipe, scope)
    loadings = {g: store.read_table("head_loadings", g) for g in store.list_graphs()["graph_id"]}
    carried = sorted(g for g, rows in loadings.items() if ((rows["layer"] == 5) & (rows["head"] == 3)).any())
    assert list(scope["carried"]) == carried and carried
    counts = {g: len(store.read_table("edges", g)) for g in loadings}
    per_graph = scope["edges_per_graph"]
    assert dict(zip(per_graph["graph_id"], per_graph["edges"])) == counts


def test_compaction_keeps_every_table_exactly_and_later_writes_win(tmp_path):
    store = synthetic_store(tmp_path, {"dense": 12, "sparse": 7})
    before = everything(store)
    summaries = [store.compact(v) for v in ("dense", "sparse")]
    assert [(s["graphs"], s["from_files"]) for s in summaries] == [(12, 12), (7, 7)]
    assert not [p for p in tmp_path.rglob("*.parquet") if "packs" not in p.parts]  # per-graph files gone
    assert len(list(tmp_path.rglob("*.parquet"))) == 2 * len(TABLES)
    assert_same(everything(open_store(tmp_path)), before)
    assert_same(everything(store), before)
    direct = pd.read_parquet(tmp_path / "head_loadings")  # at rest, a direct scan sees every row once
    assert len(direct) == len(before["datasets"]["head_loadings"])
    assert store.compact("dense")["from_files"] == 0  # nothing new: nothing rewritten

    expected = row_counts(store)
    store.write(rewritten := synthetic_record("dense0003", "dense", 100))
    store.delete("dense0004")
    store.write(added := synthetic_record("new0001", "dense", 101))
    store.delete("sparse0013")
    del expected["dense0004"], expected["sparse0013"]
    for record in (rewritten, added):
        expected[record.graph_id] = {t: record.tables[t].num_rows for t in DATA_TABLES}
    for reader in (store, open_store(tmp_path)):
        assert_each_graph_once(reader, expected)
        assert not reader.has_graph("dense", "dense0004") and reader.has_graph("dense", "dense0003")
        with pytest.raises(GraphNotFoundError):
            reader.load_graph("sparse0013")
        pd.testing.assert_frame_equal(reader.read_table("edges", "dense0003"),
                                      rewritten.tables["edges"].to_pandas())
    middle = everything(store)
    assert [store.compact(v)["from_files"] for v in ("dense", "sparse")] == [2, 0]
    assert_same(everything(open_store(tmp_path)), middle)
    assert not list(tmp_path.rglob("*.deleted")) and len(list(tmp_path.rglob("*.parquet"))) == 2 * len(TABLES)
    store.delete("dense0003")
    store.write(synthetic_record("dense0003", "dense", 100))  # deleted, then written again: visible once
    assert_same(everything(open_store(tmp_path)), middle)


def test_readers_see_every_graph_once_at_every_step_of_a_compaction(tmp_path, monkeypatch):
    """Each file a compaction writes or removes is a moment a reader may look: at each, every graph is
    listed and scanned exactly once and reads back the same. Also with a packed graph rewritten and one
    deleted before it (the second compaction)."""
    store = synthetic_store(tmp_path, {"dense": 4, "sparse": 1})
    steps = []
    write_pieces, delete_quietly = StoreFiles.write_pieces, StoreFiles.delete_quietly

    want = {}

    def check(step):
        steps.append(step)
        assert_same(everything(open_store(tmp_path)), want["before"])

    for round_ in range(2):
        if round_ == 1:  # a packed graph rewritten and one deleted before the second compaction
            store.write(synthetic_record("dense0001", "dense", 40))
            store.delete("dense0002")
        want["before"] = everything(store)
        monkeypatch.setattr(StoreFiles, "write_pieces", lambda self, *a: (write_pieces(self, *a), check("write"))[0])
        monkeypatch.setattr(StoreFiles, "delete_quietly", lambda self, path: (delete_quietly(self, path),
                                                                              check("delete"))[0])
        store.compact("dense")
        monkeypatch.undo()
        assert_same(everything(store), want["before"])
    assert steps.count("write") == 2 * len(TABLES) and steps.count("delete") >= 4 * len(TABLES)


def test_a_reader_whose_files_vanish_mid_read_looks_again(tmp_path, monkeypatch):
    store = synthetic_store(tmp_path, {"dense": 3})
    want = everything(store)
    reader = open_store(tmp_path)
    original = StoreReader.read_located
    compacted = []

    def compaction_finishes_first(self, where, table, columns=None):
        if self is reader._reader and not compacted:
            compacted.append(open_store(tmp_path).compact("dense"))  # removes the files `where` points at
        return original(self, where, table, columns)

    monkeypatch.setattr(StoreReader, "read_located", compaction_finishes_first)
    graph_id = want["listing"]["graph_id"][1]
    loaded = reader.load_graph(graph_id)
    assert compacted and not list((tmp_path / "nodes").rglob(f"{graph_id}.parquet"))
    pd.testing.assert_frame_equal(loaded.qk_pairs, want["graphs"][graph_id]["qk_pairs"])
    monkeypatch.undo()
    (tmp_path / "edges" / "variant=dense" / "packs").rename(tmp_path / "moved")
    with pytest.raises(StoreError, match="is missing: the store is incomplete"):
        open_store(tmp_path).load_graph(graph_id)


@pytest.mark.parametrize("crash", ["before_commit", "mid_cleanup"])
def test_a_crash_mid_compaction_leaves_every_graph_readable_once(tmp_path, monkeypatch, crash):
    store = synthetic_store(tmp_path, {"dense": 6, "sparse": 2})
    store.compact("dense")
    store.write(synthetic_record("dense0001", "dense", 60))
    store.delete("dense0002")
    store.write(synthetic_record("late", "dense", 61))
    want = everything(store)
    if crash == "before_commit":  # the pack's graphs file, the commit, is never written
        original = StoreFiles.write_file

        def dies(self, name, table, path):
            if "/packs/" in path and name == "graphs":
                raise OSError("killed")
            original(self, name, table, path)

        monkeypatch.setattr(StoreFiles, "write_file", dies)
    else:  # committed; dies after removing a few old files
        original, removed = StoreFiles.delete_quietly, []

        def dies(self, path):
            if len(removed) == 3:
                raise OSError("killed")
            removed.append(path)
            original(self, path)

        monkeypatch.setattr(StoreFiles, "delete_quietly", dies)
    with pytest.raises(OSError, match="killed"):
        store.compact("dense")
    monkeypatch.undo()
    assert_same(everything(open_store(tmp_path)), want)
    summary = open_store(tmp_path).compact("dense")  # the next compaction finishes the job
    assert (summary["graphs"], summary["from_files"]) == (6, {"before_commit": 2, "mid_cleanup": 1}[crash])
    assert_same(everything(open_store(tmp_path)), want)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert sum("variant=dense" in str(p) for p in files) == len(TABLES)  # one pack, no leftovers
    assert sum("variant=sparse" in str(p) for p in files) == 2 * len(TABLES)
