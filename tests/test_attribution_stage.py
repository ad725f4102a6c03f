"""The attribution stage end to end on tiny dense and gated models: store contents, failures (recorded in
the store, skipped on rerun, retried when forced), resume."""

from __future__ import annotations

import pytest
import torch

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.stage import run
from attribution.store import open_store
from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import tiny_model
from tests.test_attribution import N_FEATURES, TINY, random_clt
from transcoders.clt import save_clt

SMALL = TINY.model_copy(update={"max_position_embeddings": 24})
PROMPTS = ["The cat sat on", "Hello world", "x" * 40, ""]  # the last two cannot be attributed


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    model, tokenizer = tiny_model(SMALL)
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.3, 0.3, gated.offsets.numel()).view_as(gated.offsets))
    gated.save(root / "sparse", tokenizer)
    save_clt(random_clt(SMALL.n_layers, SMALL.d_model, N_FEATURES, seed=0), root / "clt")
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
    from attribution.stage import PromptItem, prompt_items
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
