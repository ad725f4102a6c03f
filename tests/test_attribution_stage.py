"""The attribution stage end to end on tiny dense and gated models: store contents, failures (recorded in
the store, skipped on rerun, retried when forced), resume, graph ids from contents, replacing runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.stage import PromptItem, batch_graph_ids, run
from attribution.store import open_store
from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import tiny_model
from tests.test_attribution import N_FEATURES, TINY, random_clt
from transcoders.clt import clt_content_id, save_clt

SMALL = TINY.model_copy(update={"max_position_embeddings": 24})
PROMPTS = ["The cat sat on", "Hello world", "x" * 40, ""]  # the last two cannot be attributed


def save_tiny_sources(root: Path) -> None:
    """A gated SMALL model with spread offsets in `root`/sparse and a random CLT of it in `root`/clt."""
    model, tokenizer = tiny_model(SMALL)
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.3, 0.3, gated.offsets.numel()).view_as(gated.offsets))
    gated.save(root / "sparse", tokenizer)
    save_clt(random_clt(SMALL.n_layers, SMALL.d_model, N_FEATURES, seed=0), root / "clt")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    save_tiny_sources(root)
    return root, ModelSpec(name="tiny", tiny=SMALL), root / "sparse", root / "clt"


def test_stage_writes_both_variants_and_records_failures(sources):
    root, dense, sparse, clt = sources
    config = AttributionStageConfig(graph=GraphConfig(), attention=AttentionAttributionConfig(max_attention_edges=20))
    store_dir = root / "graphs"
    summaries = {variant: run(config, source, clt, PROMPTS, store_dir, variant, progress=False)
                 for variant, source in (("dense", dense), ("sparse", sparse))}
    for summary in summaries.values():
        assert [g["prompt"] for g in summary["graphs"]] == PROMPTS[:2]
        errors = {f["prompt"]: f["error"] for f in summary["failures"]}
        assert "context of 24" in errors["x" * 40] and "non-empty" in errors[""]
    store = open_store(store_dir)
    assert store.variants() == ["dense", "sparse"] and len(store.list_graphs()) == 4
    failures = store.failures()
    assert sorted(failures["variant"]) == ["dense", "dense", "sparse", "sparse"]
    row = failures[(failures["variant"] == "sparse") & (failures["prompt"] == "x" * 40)].iloc[0]
    assert (row["task"], row["prompt_index"], row["error_type"]) == ("custom", 2, "PromptTooLongError")
    assert "context of 24" in row["message"] and len(store.failures("dense")) == 2
    again = run(config, sparse, clt, PROMPTS, store_dir, "sparse", progress=False)
    assert len(again["skipped"]) == 4 and not again["graphs"] and not again["failures"]
    assert again["failures_in_store"] == 2
    assert store.failures("sparse")["created"].tolist() == failures[failures["variant"] == "sparse"]["created"].tolist()
    forced = run(config, sparse, clt, PROMPTS[3:], store_dir, "sparse", progress=False, force=True)
    assert [f["error_type"] for f in forced["failures"]] == ["AttributionError"] and len(store.failures()) == 4

    graph_id = summaries["sparse"]["graphs"][0]["graph_id"]
    stored = store.load_graph(graph_id)
    assert len(stored.head_loadings) > 0 and len(stored.qk_pairs) > 0
    weights = stored.edges.set_index(["target", "source"])["weight"]
    for (target, source, _), rows in stored.head_loadings.groupby(["target", "source", "layer"]):
        assert abs(rows["weight"].sum() - weights[(target, source)]) <= 1e-4 * max(1.0, abs(weights[(target, source)]))
    for _, rows in stored.qk_pairs.groupby(["layer", "head", "query_pos", "key_pos"]):
        logit = rows["gate_logit"].iloc[0]
        assert logit > 0  # sparse variant: attention edges that carry graph edges are open
        total = rows[rows["kind"].isin(["pair", "pair_rest", "offset"])]["value"].sum()
        assert abs(total - logit) <= 1e-4 * max(1.0, abs(logit))
    keys = ["layer", "head", "query_pos", "key_pos"]
    carried = stored.head_loadings.merge(stored.qk_pairs[keys].drop_duplicates(), on=keys).iloc[0]
    behind = store.qk_pairs_for_edge(graph_id, int(carried["target"]), int(carried["source"]))
    assert ((behind["layer"] == carried["layer"]) & (behind["head"] == carried["head"])).any()


def test_prompt_sets_take_the_first_clean_prompts_and_tag_graphs_with_their_task(sources, tmp_path):
    from attribution.stage import prompt_items
    from prompts.tasks import load_task

    config = AttributionStageConfig(prompts=["Hello world"], prompt_sets={"antonyms": 2, "induction": 1},
                                    attention=AttentionAttributionConfig(enabled=False))
    items = prompt_items(config)
    antonyms, induction = load_task("antonyms"), load_task("induction")
    assert items == [PromptItem(antonyms[0].clean, "antonyms", 0), PromptItem(antonyms[1].clean, "antonyms", 1),
                     PromptItem(induction[0].clean, "induction", 0), PromptItem("Hello world", "custom", 0)]
    root, dense, _, clt = sources
    short = AttributionStageConfig(prompts=["The cat sat on", "Hello world"],
                                   attention=AttentionAttributionConfig(enabled=False))
    run(short, dense, clt, [PromptItem("The cat sat on", "antonyms", 7), "Hello world"], tmp_path, "dense",
        progress=False)
    graphs = open_store(tmp_path).list_graphs().sort_values("prompt")
    assert graphs[["prompt", "task", "prompt_index"]].values.tolist() == [
        ["Hello world", "custom", 1], ["The cat sat on", "antonyms", 7]]


@pytest.mark.parametrize("update, message", [
    ({"prompt_sets": {"nope": 3}}, "unknown task 'nope'"),
    ({"prompt_sets": {"ioi": 0}}, "positive count"),
    ({"prompts": []}, "no prompts"),
])
def test_bad_prompt_sets_are_refused(update, message):
    with pytest.raises(ValueError, match=message):
        AttributionStageConfig(**update)


# --------------------------------------------------------------------------------------------------
# Content keys


def test_graph_ids_come_from_contents_not_paths_or_file_times(sources, tmp_path):
    root, _, sparse, clt = sources
    config = AttributionStageConfig(attention=AttentionAttributionConfig(enabled=False))
    first = run(config, sparse, clt, PROMPTS[:2], tmp_path / "graphs", "sparse", progress=False)
    sparse_copy, clt_copy = tmp_path / "elsewhere" / "model", tmp_path / "elsewhere" / "clt"
    shutil.copytree(sparse, sparse_copy)  # new paths and new file times, same bytes
    shutil.copytree(clt, clt_copy)
    for path in [*sparse_copy.iterdir(), *clt_copy.iterdir()]:
        os.utime(path, ns=(1, 1))
    again = run(config, sparse_copy, clt_copy, PROMPTS[:2], tmp_path / "graphs", "sparse", progress=False)
    assert sorted(again["skipped"]) == sorted(g["graph_id"] for g in first["graphs"]) and not again["graphs"]
    assert batch_graph_ids(config, [PromptItem(p) for p in PROMPTS[:2]], sparse_copy, clt_copy, "sparse") == \
        set(again["skipped"])


def test_a_replacing_run_after_a_clt_change_leaves_no_stale_or_duplicate_graphs(sources, tmp_path):
    root, dense, _, clt = sources
    config = AttributionStageConfig(attention=AttentionAttributionConfig(enabled=False))
    store_dir = tmp_path / "graphs"
    old = run(config, dense, clt, PROMPTS, store_dir, "dense", progress=False, replace=True)
    other = run(config, dense, clt, PROMPTS[:1], store_dir, "other", progress=False)  # another variant stays
    retrained = tmp_path / "retrained"
    save_clt(random_clt(SMALL.n_layers, SMALL.d_model, N_FEATURES, seed=1), retrained)
    new = run(config, dense, retrained, PROMPTS, store_dir, "dense", progress=False, force=True, replace=True)
    old_ids = {g["graph_id"] for g in old["graphs"]} | {f["graph_id"] for f in old["failures"]}
    new_ids = {g["graph_id"] for g in new["graphs"]} | {f["graph_id"] for f in new["failures"]}
    assert set(new["removed"]) == old_ids and not old_ids & new_ids
    store = open_store(store_dir)
    graphs = store.list_graphs("dense")
    assert set(graphs["graph_id"]) == {g["graph_id"] for g in new["graphs"]}
    assert not graphs.duplicated(["task", "prompt_index"]).any() and len(graphs) == 2
    assert set(store.failures("dense")["failure_id"]) == {f["graph_id"] for f in new["failures"]}
    assert list(store.list_graphs("other")["graph_id"]) == [other["graphs"][0]["graph_id"]]
    assert all(json.loads(c)["sha256"] == clt_content_id(retrained) for c in graphs["clt"])


def test_an_influence_share_stores_the_loadings_of_the_most_influential_edges_only(sources, tmp_path):
    _, _, sparse, clt = sources
    every = AttributionStageConfig(graph=GraphConfig(), attention=AttentionAttributionConfig(
        max_attention_edges=20, edge_influence_share=1.0))
    half = every.model_copy(update={"attention": every.attention.model_copy(update={"edge_influence_share": 0.5})})
    stored = {}
    for name, config in (("every", every), ("half", half)):
        run(config, sparse, clt, PROMPTS[:1], tmp_path / name, "sparse", progress=False)
        store = open_store(tmp_path / name)
        stored[name] = store.load_graph(store.list_graphs()["graph_id"].iloc[0])
    assert stored["every"].info["graph_id"] != stored["half"].info["graph_id"]
    assert json.loads(stored["half"].info["settings"])["attention"]["edge_influence_share"] == 0.5
    pd.testing.assert_frame_equal(stored["half"].edges, stored["every"].edges.assign(graph_id=stored["half"].info["graph_id"]))
    keys = ["target", "source", "layer", "head"]
    loaded = stored["half"].head_loadings.drop(columns="graph_id").sort_values(keys).reset_index(drop=True)
    whole = stored["every"].head_loadings.drop(columns="graph_id")
    expected = whole.merge(loaded[["target", "source"]].drop_duplicates()).sort_values(keys).reset_index(drop=True)
    assert 0 < loaded[["target", "source"]].drop_duplicates().shape[0] < whole[["target", "source"]].drop_duplicates().shape[0]
    pd.testing.assert_frame_equal(loaded, expected, rtol=1e-5, atol=1e-6)
