"""The dense vs sparse comparison: metric functions on hand-built tables (exact values), component circuits
per task on tiny models, and the compare stage and its report on a tiny pipeline run."""

from __future__ import annotations

import dataclasses
import html
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

import circuits.curves
from attribution.prune import influence, logit_weight_vector, normalize_rows
from attribution.store import open_store
from circuits.config import ComponentCircuitConfig
from circuits.stats import bootstrap_mean
from comparison.config import RATIO, CircuitsConfig, CompareConfig, CompareError
from comparison.formatting import component_label, fmt, fmt_ci, metric_title
from comparison.graph_metrics import (
    count_to_share,
    edge_influence,
    head_metrics,
    head_part_influence,
    qk_edge_scores,
    qk_edge_shares,
    weighted_median,
)
from comparison.inputs import most_influential_attention_edge
from comparison.report import REPORT_FILE
from comparison.stage import compare_store
from comparison.summaries import run_circuits, summarize
from pipeline.config import load_config
from pipeline.orchestrate import run_pipeline
from prompts.tasks import load_task
from runtime.precision import bf16_supported
from sparse_attention import architectures
from sparse_attention.models import byte_tokenizer
from tests.test_circuits import make_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# Metric functions, exact


def test_count_to_share():
    values = np.array([1.0, 4.0, 2.0, 3.0])
    assert [count_to_share(values, s) for s in (0.4, 0.7, 0.8, 0.9, 0.95, 1.0)] == [1, 2, 3, 3, 4, 4]
    assert count_to_share(np.array([]), 0.9) == 0


def test_edge_influence_by_hand():
    """Nodes 0, 1 features, 2 token, 3 logit (p = 1); edges 0 -> 3 (2), 1 -> 3 (-1), 2 -> 0 (0.5), 2 -> 1 (3).
    |A| row-normalised: A[3,0] = 2/3, A[3,1] = 1/3, A[0,2] = A[1,2] = 1; influence I = (2/3, 1/3, 1, 0);
    scores |A|[t, s] (I[t] + w[t]) = 2/3, 1/3, 2/3, 1/3."""
    target, source = np.array([3, 3, 0, 1]), np.array([0, 1, 2, 2])
    scores = edge_influence(target, source, np.array([2.0, -1.0, 0.5, 3.0]), np.array([0, 0, 0, 1.0]))
    np.testing.assert_allclose(scores, [2 / 3, 1 / 3, 2 / 3, 1 / 3], rtol=1e-12)
    assert count_to_share(scores, 0.5) == 2 and count_to_share(scores, 0.8) == 3


def test_edge_influence_equals_circuit_tracers_edge_scores():
    """On a random DAG (strictly lower-triangular, rows = targets) the sparse computation equals prune.py's
    dense one: normalize_rows(A) * (influence + logit weights)[:, None]."""
    generator = torch.Generator().manual_seed(0)
    n = 12
    adjacency = torch.randn(n, n, generator=generator, dtype=torch.float64).tril(-1)
    adjacency[torch.rand(n, n, generator=generator) < 0.4] = 0
    adjacency = torch.flip(adjacency, (0, 1))  # targets before sources: logits (last) read everything
    weights = logit_weight_vector(n, torch.tensor([0.7, 0.3], dtype=torch.float64)).double()
    normalized = normalize_rows(adjacency)
    expected = normalized * (influence(normalized, weights) + weights)[:, None]
    target, source = adjacency.nonzero().unbind(1)
    scores = edge_influence(target.numpy(), source.numpy(), adjacency[target, source].numpy(), weights.numpy())
    np.testing.assert_allclose(scores, expected[target, source].numpy(), rtol=1e-10)


def test_head_metrics_by_hand():
    loadings = pd.DataFrame({
        "target": [5, 6, 5, 5, 5, 5], "source": [1, 1, 1, 2, 1, 1],
        "layer": [0, 0, 0, 1, 0, 0], "head": [0, 0, 1, 0, -1, -2],
        "weight": [3.0, -1.0, 2.0, 0.5, 10.0, 5.0],
    })  # head masses: (0,0) 4, (0,1) 2, (1,0) 0.5; the skip (-1) and other heads (-2) are no head
    counts = ("n_heads_any", "n_heads_carrying", "n_heads_cover")
    assert {k: head_metrics(loadings, 0.1, 0.9)[k] for k in counts} == dict(zip(counts, (3, 2, 2)))
    assert {k: head_metrics(loadings, 0.05, 0.95)[k] for k in counts} == dict(zip(counts, (3, 3, 3)))
    assert {k: head_metrics(loadings[loadings["head"] < 0], 0.1, 0.9)[k] for k in counts} == dict(zip(counts, (0, 0, 0)))


def test_example_edge_is_the_most_influential_non_sink_attention_edge():
    loadings = pd.DataFrame({"head": [0, 1, 2, -1, 3], "weight": [9.0, 1.0, 2.0, 5.0, 1.0],
                             "query_pos": [4, 4, 3, -1, 4], "key_pos": [0, 2, 1, -1, 3], "layer": [0, 0, 1, 0, 1]})
    influence = np.array([0.9, 0.2, 0.3, 0.5, 0.1])  # the sink part (head 0 -> key 0) carries the most
    assert most_influential_attention_edge(loadings, influence)["head"] == 2
    assert most_influential_attention_edge(loadings, influence, query_pos=4)["head"] == 1  # into the last token
    assert most_influential_attention_edge(loadings, np.zeros(5)) is None  # nothing on the path to the logit


def test_attention_metrics_weight_by_influence_and_keep_the_sink_apart():
    """Graph edges 5<-1 (influence 0.9) and 6<-1 (0.1). Edge 5<-1 in layer 0: head (0,0) carries 3 of |3| + |1|
    (skip) via (q 4, k 2), head (0,1) carries 1 of it via the BOS sink (k 0); edge 6<-1: head (1,0) carries
    all of it via (q 4, k 3). Influence masses: (0,0) 0.675, (0,1) 0.225 (sink), (1,0) 0.1."""
    edges = pd.DataFrame({"target": [5, 6, 7], "source": [1, 1, 2], "weight": [1.0, 1.0, 1.0],
                          "kept": [True, True, False]})
    loadings = pd.DataFrame({
        "target": [5, 5, 5, 6], "source": [1, 1, 1, 1], "layer": [0, 0, 0, 1], "head": [0, 1, -1, 0],
        "weight": [3.0, -1.0, 0.0, 2.0], "query_pos": [4, 4, -1, 4], "key_pos": [2, 0, -1, 3],
    })
    influence = head_part_influence(loadings, edges, np.array([0.9, 0.1]))
    np.testing.assert_allclose(influence, [0.675, 0.225, 0.0, 0.1])
    metrics = head_metrics(loadings, 0.2, 0.9, influence)
    assert metrics["n_heads_any"] == 3 and metrics["n_heads_carrying"] == 1  # (1,0) holds 0.1 / 0.775 < 0.2
    assert metrics["n_heads_cover"] == 2 and metrics["n_attention_edges"] == 2  # 0.675 / 0.775 < 0.9
    assert metrics["n_attention_edges_cover"] == 2 and metrics["n_sink_attention_edges"] == 1
    assert metrics["sink_share"] == pytest.approx(0.225)
    assert head_metrics(loadings, 0.2, 0.85, influence)["n_heads_cover"] == 1
    assert head_metrics(loadings, 0.2, 0.9)["n_heads_carrying"] == 2  # by |part|: (0,0) 3 and (1,0) 2 of 5, no sink
    assert weighted_median(np.array([0.1, 0.9, 0.5]), np.array([1.0, 5.0, 1.0])) == 0.9
    assert np.isnan(weighted_median(np.array([0.1, np.nan]), np.array([0.0, 1.0])))  # no finite value with weight


def test_qk_edge_shares_by_hand():
    """Pairs 0.5, -0.2, 0.1 + rest 0.1 + offset 0.5 = logit 1.0; score 0.5; top-1 share 1.0, top-2 0.6,
    top-5 0.8. Marginal rows do not count."""
    key = {"layer": 1, "head": 2, "query_pos": 7, "key_pos": 3}
    rows = [("pair", "a", "x", -0.2), ("pair", "b", "y", 0.5), ("pair", "c", "z", 0.1), ("pair_rest", "*", "*", 0.1),
            ("offset", "b", "b", 0.5), ("query_marginal", "b", "*", 0.4), ("query_marginal_rest", "*", "*", 0.1)]
    pairs = pd.DataFrame([{**key, "kind": k, "query_component": q, "key_component": c, "value": v, "gate_logit": 1.0}
                          for k, q, c, v in rows])
    other = pd.DataFrame([{**key, "head": 0, "kind": k, "query_component": "q", "key_component": "k", "value": v,
                           "gate_logit": -0.5} for k, v in (("pair", -0.4), ("pair", 0.3), ("pair_rest", -0.4))])
    shares = qk_edge_shares(pd.concat([pairs, other]), [1, 2, 5])  # a second edge (head 0): sorted first
    assert len(shares) == 2
    assert shares.iloc[0][["score", "offset", "top1_share", "top2_share"]].tolist() == pytest.approx(
        [-0.5, 0.0, 0.8, 0.2])
    row = shares.iloc[1]
    assert (row["score"], row["offset"], row["n_pairs"]) == pytest.approx((0.5, 0.5, 3))
    assert (row["top1_share"], row["top2_share"], row["top5_share"]) == pytest.approx((1.0, 0.6, 0.8))
    assert (row["top_query"], row["top_key"]) == ("b", "y")


def test_summarize_pairs_dense_with_sparse_and_is_seeded():
    metrics = pd.DataFrame({
        "task": ["t"] * 5, "variant": ["dense", "dense", "dense", "sparse", "sparse"],
        "pair": ["t:0", "t:1", "t:2", "t:0", "t:1"], "m": [2.0, 4.0, 100.0, 1.0, 1.0],
    })  # t:2 has no sparse graph: in the dense mean, not in the ratio
    summary = summarize(metrics, ["m"], 500, 0.95, seed=0).set_index("variant")
    assert summary.loc["dense", "n"] == 3 and summary.loc["dense", "mean"] == pytest.approx(106 / 3)
    assert summary.loc["sparse", ["mean", "ci_low", "ci_high"]].tolist() == [1.0, 1.0, 1.0]
    ratio = summary.loc[RATIO]
    assert ratio["n"] == 2 and ratio["mean"] == pytest.approx(3.0)
    assert 2.0 <= ratio["ci_low"] <= 3.0 <= ratio["ci_high"] <= 4.0
    again = summarize(metrics, ["m"], 500, 0.95, seed=0).set_index("variant")
    pd.testing.assert_frame_equal(summary, again)
    assert bootstrap_mean(np.array([5.0]), 100, 0.95, np.random.default_rng(0)) == (5.0, 5.0, 5.0)


def test_labels_and_formatting():
    assert component_label("3_17_5", {(3, 17): "opposite"}) == "L3:F17 opposite@5"
    assert component_label("3_17_5") == "L3:F17@5"
    assert component_label("3_-1_5") == "err L3@5"
    assert component_label("E_34_1", token_strings=["<s>", "large"]) == "'large'@1"
    assert component_label("attn_0_3_1") == "L0H3@1" and component_label("bias_4") == "bias@4"
    assert [fmt(v) for v in (None, float("nan"), 12.0, 0.123456, 1234.5, 3.14159)] == ["-", "-", "12", "0.123",
                                                                                         "1234", "3.14"]
    assert metric_title("n_edges_influence_80") == "edges for 80% of edge influence"


@pytest.mark.parametrize("update, message", [
    ({"influence_shares": [0.0]}, "influence_shares"),
    ({"qk_top_k": [0]}, "qk_top_k"),
    ({"circuits": {"tasks": ["nope"]}}, "unknown tasks"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_compare_config_is_refused(update, message):
    with pytest.raises(ValueError, match=message):
        CompareConfig.model_validate(update)


# --------------------------------------------------------------------------------------------------
# Component circuits per task


def test_run_circuits_gives_curves_ratios_and_status_rows(capsys):
    """Greater-Than (digits are single bytes) on a tiny dense model and its gated copy, in both gate modes;
    antonyms' answers are words, so no prompt fits the byte tokenizer: a status row says so instead of numbers."""
    tokenizer = byte_tokenizer()
    models = {"dense": (make_model("dense"), tokenizer), "sparse": (make_model("gated"), tokenizer)}
    circuit = ComponentCircuitConfig(curve_points=4, batch_size=4, dense_points=2, faithfulness_edges=4,
                                     min_clean_logit_diff=-1e9, min_clean_accuracy=0.0, min_prompt_gap=0.0,
                                     bootstrap_samples=100, precision="fp32")  # exact endpoints
    config = CircuitsConfig(prompts_per_task=3, circuit=circuit)
    curves, summary, prompts = run_circuits(config, models, ["greater_than", "antonyms"], samples=300)
    ok = summary[summary["task"] == "greater_than"]
    assert (ok["status"] == "ok").all() and (ok["behaviour_gate"] == "passed").all()
    assert sorted(set(ok["gates"])) == ["frozen", "recomputed"] and ok.loc[ok["headline"], "gates"].eq("frozen").all()
    for gates in ("frozen", "recomputed"):
        rows = ok[ok["gates"] == gates].set_index("kind")
        assert list(rows.index) == ["heads", "edges", "role_edges"]
        for kind in ("heads", "edges", "role_edges"):
            row = rows.loc[kind]
            assert row["ratio"] == pytest.approx(row["dense_count"] / row["sparse_count"])
            assert row["ratio_ci_low"] <= row["ratio"] <= row["ratio_ci_high"]
            assert row["paper_ratio_min"] == {"heads": 1.4, "edges": 5.4, "role_edges": 5.4}[kind]
            for variant in ("dense", "sparse"):
                curve = curves[(curves["variant"] == variant) & (curves["kind"] == kind)
                               & (curves["gates"] == gates)].set_index("count")
                assert curve.loc[0, "explained_effect"] == pytest.approx(0.0, abs=1e-5)
                assert curve.loc[row[f"{variant}_total"], "explained_effect"] == pytest.approx(1.0, abs=1e-4)
                assert row[f"{variant}_count"] == curve.loc[curve["explained_effect"] >= 0.9, "carrying"].min()
                assert (curve["carrying"] <= curve.index).all()  # carrying edges are among those kept
    dense_curves = curves[curves["variant"] == "dense"]
    pd.testing.assert_frame_equal(  # no gates: the dense model is traced once and serves both modes
        dense_curves[dense_curves["gates"] == "frozen"].drop(columns="gates").reset_index(drop=True),
        dense_curves[dense_curves["gates"] == "recomputed"].drop(columns="gates").reset_index(drop=True))
    failed = summary[summary["task"] == "antonyms"]
    assert len(failed) == 3 and failed["status"].str.contains("no prompt of antonyms fits").all()
    assert failed["ratio"].isna().all() and failed["prompt_ratio"].isna().all()

    # per prompt: each row is that prompt's own circuit, and the summary's ratio is of their mean counts
    assert set(prompts["task"]) == {"greater_than"} and sorted(set(prompts["prompt_index"])) == [0, 1, 2]
    task_prompts = load_task("greater_than")
    for variant, (model, _) in models.items():
        alone = circuits.curves.run(config.circuit, model, tokenizer, task_prompts[1:2], "recomputed")
        rows = prompts[(prompts["variant"] == variant) & (prompts["prompt_index"] == 1)
                       & (prompts["gates"] == "recomputed")].set_index("kind")
        for kind in ("heads", "edges", "role_edges"):
            assert rows.loc[kind, "count_at_target"] == getattr(alone, kind).count_at_target
            assert rows.loc[kind, "metric_clean"] == pytest.approx(alone.metric_clean)
    for (gates, kind), row in ok.set_index(["gates", "kind"]).iterrows():
        part = prompts[(prompts["kind"] == kind) & (prompts["gates"] == gates)]
        wide = part.pivot(index="prompt_index", columns="variant", values="count_at_target").dropna().astype(float)
        assert row["prompt_pairs"] == len(wide) > 0
        assert row["prompt_ratio"] == pytest.approx(wide["dense"].mean() / wide["sparse"].mean())
        assert row["prompt_ratio_ci_low"] <= row["prompt_ratio"] <= row["prompt_ratio_ci_high"]
        assert row["dense_prompts_dropped"] == row["sparse_prompts_dropped"] == 0
    again = run_circuits(config, models, ["greater_than"], samples=300)[1]
    pd.testing.assert_frame_equal(again, summary[summary["task"] == "greater_than"].reset_index(drop=True))
    capsys.readouterr()
    pooled_only = run_circuits(config.model_copy(update={"per_prompt": False}), models, ["greater_than"], progress=True)
    assert pooled_only[2] is None and "prompt_ratio" not in pooled_only[1].columns
    # one step per traced circuit: the dense model once, the sparse one per gate mode
    err = capsys.readouterr().err
    assert "component circuits: 100%" in err and "3/3" in err


def test_run_circuits_behaviour_gate_and_prompt_floor():
    """Default thresholds: tiny random models do not do Greater-Than, so the summary has counts but no ratio and
    says why; every prompt's gap is under the floor, so every per-prompt circuit is dropped and counted."""
    tokenizer = byte_tokenizer()
    models = {"dense": (make_model("dense"), tokenizer), "sparse": (make_model("gated"), tokenizer)}
    circuit = ComponentCircuitConfig(curve_points=3, batch_size=4, dense_points=0, faithfulness_edges=0,
                                     role_edges=False, other_gates=False, bootstrap_samples=50)
    curves, summary, prompts = run_circuits(CircuitsConfig(prompts_per_task=2, circuit=circuit), models,
                                            ["greater_than"], samples=50)
    assert summary["behaviour_gate"].str.startswith("dense: mean clean logit diff").all()
    assert summary["ratio"].isna().all() and summary["dense_count"].notna().all()
    assert (summary["dense_prompts_dropped"] == 2).all() and (summary["prompt_pairs"] == 0).all()
    assert prompts["status"].str.startswith("dropped: clean - corrupted logit diff").all()


# --------------------------------------------------------------------------------------------------
# The stage and the report on a tiny pipeline run


# the tiny preset, shortened: 4 sparsify steps leave most gates open, which is all these tests need
FAST = ["sparsify.train.steps=4", "sparsify.train.checkpoint_every=4", "sparsify.eval.heldout_blocks=4",
        "sparsify.eval.long_blocks=1", "clt.train.steps=30", "clt.eval.heldout_blocks=4"]
if not bf16_supported("cpu"):  # the stages' bf16 default is refused on a CPU without bfloat16 units
    FAST += ["sparsify.train.precision=fp32", "clt.precision=fp32", "features.precision=fp32"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    config = load_config(preset="tiny", overrides=FAST)
    results = run_pipeline(config, ["sparsify", "clt", "features", "attribution", "compare"], str(root), executor="local",
                           progress=False)
    return root, config, results


def test_compare_stage_tables_match_the_store(tiny_run):
    root, config, results = tiny_run
    assert results["compare"]["skipped"] is False
    graphs = open_store(root / "graphs").list_graphs()
    metrics = pd.read_parquet(root / "comparison" / "graph_metrics.parquet")
    assert len(metrics) == len(graphs) == 2 * (len(config.attribution.prompts) + 4)
    merged = metrics.merge(graphs, on="graph_id", suffixes=("", "_store"))
    assert (merged["n_edges_kept"] == merged["n_edges_kept_store"]).all()
    assert (merged["completeness_score"] == merged["completeness_score_store"]).all()
    assert set(metrics["pair"]) >= {"greater_than:0", "greater_than:1", "antonyms:0", "antonyms:1"}
    assert (metrics["n_edges_influence_80"] <= metrics["n_edges_influence_90"]).all()
    assert (metrics["n_edges_influence_90"] <= metrics["n_edges_kept"]).all()
    summary = pd.read_parquet(root / "comparison" / "task_summary.parquet")
    assert {"greater_than", "antonyms", "custom", "all"} <= set(summary["task"])
    assert (summary.loc[summary["variant"] == RATIO, "n"] == summary.loc[summary["variant"] == RATIO, "task"].map(
        {"greater_than": 2, "antonyms": 2, "custom": 3, "all": 7})).all()
    circuits = pd.read_parquet(root / "comparison" / "circuit_summary.parquet")
    assert set(circuits["task"]) == {"greater_than", "antonyms"}  # every task but custom, each with a status
    saved = (root / "comparison" / "compare_config.yaml").read_text()
    assert "prompts_per_task: 2" in saved


def test_report_numbers_are_the_tables_numbers(tiny_run):
    root, _, _ = tiny_run
    out = root / "comparison"
    page = (out / REPORT_FILE).read_text()
    for image in re.findall(r'<img src="([^"]+)"', page):
        assert (out / image).is_file(), image
    assert len(re.findall(r'<img src="report_files/graph_[a-z_]+_(?:dense|sparse).png', page)) == 6  # 3 tasks x 2 variants
    summary = pd.read_parquet(out / "task_summary.parquet")
    rows = re.findall(r"<tr>(.*?)</tr>", page)
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    table = {(c[0], c[1]): c[2:] for c in cells if len(c) == 6}
    for (task, metric), part in summary.groupby(["task", "metric"]):
        shown = table[(task, html.escape(metric_title(metric)))]
        by_variant = part.set_index("variant")
        for cell, variant in zip(shown, ("dense", "sparse", RATIO)):
            expected = fmt_ci(*by_variant.loc[variant, ["mean", "ci_low", "ci_high"]]) if variant in by_variant.index \
                else "-"
            assert cell == expected, (task, metric, variant)
    circuits = pd.read_parquet(out / "circuit_summary.parquet")
    for row in circuits.itertuples():
        assert html.escape(row.status) in page
        gates = f"{row.gates}{' *' if row.headline else ''}"
        assert f"<td>{row.task}</td><td>{gates}</td><td>{row.kind}</td><td>{fmt(row.dense_count)}</td>" \
               f"<td>{fmt(row.sparse_count)}</td><td>{fmt_ci(row.ratio, row.ratio_ci_low, row.ratio_ci_high)}</td>" \
               f"<td>{fmt(row.dense_stays_above)} / {fmt(row.sparse_stays_above)}</td>" \
               f"<td>{fmt_ci(row.ratio_stays_above, row.ratio_stays_above_ci_low, row.ratio_stays_above_ci_high)}" \
               f"</td><td>{fmt_ci(row.prompt_ratio, row.prompt_ratio_ci_low, row.prompt_ratio_ci_high)}</td>" \
               f"<td>{fmt(row.prompt_pairs)}</td>" in page
    prompts = pd.read_parquet(out / "circuit_prompts.parquet")
    assert set(prompts["task"]) == set(circuits.loc[circuits["status"] == "ok", "task"])
    if prompts["count_at_target"].notna().any():
        assert '<img src="report_files/prompt_circuits.png">' in page
    pairs = pd.read_parquet(out / "example_qk_pairs.parquet")
    for value in pairs["share_of_score"]:
        assert f"<td>{fmt(value)}</td>" in page
    sparsity = pd.read_parquet(out / "sparsity.parquet")
    assert f"<td>{fmt(sparsity['overall_edge_fraction'].iloc[0])}</td>" in page


def test_report_takes_its_metrics_and_settings_from_the_saved_config(tiny_run, tmp_path):
    """Non-default settings reach the report through compare_config.yaml: the task table lists the configured
    influence share, top-k and head cover with the summary's numbers, and not the default ones."""
    root, _, _ = tiny_run
    config = CompareConfig(influence_shares=[0.5], qk_top_k=[2], head_cover=0.8, confidence=0.9,
                           bootstrap_samples=200)
    compare_store(root / "graphs", tmp_path, config, progress=False)
    page = (tmp_path / REPORT_FILE).read_text()
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page)]
    table = {(c[0], c[1]): c[2:] for c in cells if len(c) == 6}
    summary = pd.read_parquet(tmp_path / "task_summary.parquet")
    for metric in ("n_edges_influence_50", "qk_top2_share", "n_heads_cover"):
        for task, part in summary[summary["metric"] == metric].groupby("task"):
            dense = part.set_index("variant").loc["dense"]
            shown = table[(task, html.escape(metric_title(metric, head_cover=0.8)))]
            assert shown[0] == fmt_ci(dense["mean"], dense["ci_low"], dense["ci_high"]), (task, metric)
    titles = {title for _, title in table}
    assert "heads for 80% of head-carried weight" in titles and "heads for 90% of head-carried weight" not in titles
    assert html.escape(metric_title("n_edges_influence_80")) not in titles
    assert html.escape(metric_title("qk_top1_share")) not in titles
    assert "Mean over prompts with 90% bootstrap CI" in page


def test_compare_stage_is_skipped_when_done_and_runs_as_a_plain_function(tiny_run, tmp_path):
    root, config, _ = tiny_run
    report = root / "comparison" / REPORT_FILE
    stamp = report.stat().st_mtime_ns
    again = run_pipeline(config, ["compare"], str(root), executor="local", progress=False)
    assert again["compare"]["skipped"] is True and report.stat().st_mtime_ns == stamp
    summary = compare_store(root / "graphs", tmp_path, CompareConfig(bootstrap_samples=500, report=False),
                            labels=None, progress=False)
    assert len(summary["left_out"]) == 3 and summary["report"] is None
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "graph_metrics.parquet"),
                                  pd.read_parquet(root / "comparison" / "graph_metrics.parquet"))
    assert json.loads(json.dumps(summary))["graphs"] == 14


def test_a_family_refusing_circuits_gets_the_feature_comparison_and_one_statement(tiny_run, tmp_path, monkeypatch):
    """Component circuits on a family that refuses them (Gemma, OLMo-2, GPT-2): no crash, no circuit tables; the
    summary's left_out and the report say so once, with the family's reason, and the rest is written."""
    root, config, _ = tiny_run
    llama = architectures.ARCHITECTURES["llama"]
    monkeypatch.setitem(architectures.ARCHITECTURES, "llama",
                        dataclasses.replace(llama, refused={"circuits": "a reason <given> here"}))
    summary = compare_store(root / "graphs", tmp_path, CompareConfig(bootstrap_samples=200),
                            dense_model=config.sparsify.model, sparse_model=root / "sparsify" / "model",
                            sparsify_metrics=root / "sparsify" / "metrics.json", progress=False)
    statement = "component circuits: refused for model family 'llama': a reason <given> here"
    assert summary["left_out"] == [statement]
    assert not (tmp_path / "circuit_summary.parquet").exists() and (tmp_path / "attention_pattern.parquet").exists()
    page = (tmp_path / REPORT_FILE).read_text()
    assert page.count(html.escape(statement)) == 1 and "<h2>Component circuits</h2>" not in page
    assert "<h2>Feature-level circuits</h2>" in page


def test_empty_store_is_a_clear_error(tmp_path):
    with pytest.raises(CompareError, match="holds no graphs; run the attribution stage first"):
        compare_store(tmp_path / "no_graphs", tmp_path / "out", CompareConfig(report=False), progress=False)


def test_qk_edge_score_is_what_the_pairs_split_under_a_soft_cap():
    """With an attention soft-cap (Gemma-2) the gate logit is cap * tanh(s / cap) + offset; the score whose
    shares the pairs explain is the pre-cap s = pairs + pair_rest, not gate logit - offset."""
    cap, offset, pairs, rest = 2.0, -0.25, [1.5, 0.75], 0.5
    logit = cap * np.tanh(sum(pairs, rest) / cap) + offset
    rows = pd.DataFrame({"layer": 0, "head": 1, "query_pos": 3, "key_pos": 1,
                         "kind": ["pair", "pair", "pair_rest", "offset"], "query_component": ["a", "b", "*", "b"],
                         "key_component": ["c", "d", "*", "b"], "value": [*pairs, rest, offset],
                         "gate_logit": logit})
    scored = qk_edge_scores(rows).iloc[0]
    assert scored["score"] == pytest.approx(2.75, abs=1e-12)
    assert scored["offset"] == offset and scored["gate_logit"] == pytest.approx(logit)
    assert abs(scored["gate_logit"] - scored["offset"] - scored["score"]) > 0.5  # the cap matters here
    assert qk_edge_shares(rows, [1])["top1_share"].iloc[0] == pytest.approx(1.5 / 2.75)
