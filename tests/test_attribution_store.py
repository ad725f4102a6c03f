"""The Parquet store: exact round trips, atomic commits, clear errors, and the query API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
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
from attribution.store import PID_SPACE, GraphNotFoundError, GraphStore, StoreError, open_store
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
    original = GraphStore._write_file

    def dies_at_commit(self, name, table, path):
        if name == "graphs":
            raise KeyboardInterrupt
        original(self, name, table, path)

    monkeypatch.setattr(GraphStore, "_write_file", dies_at_commit)
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
