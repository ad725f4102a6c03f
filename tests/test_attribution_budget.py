"""The per-prompt step under a memory budget and under errors: a prompt that cannot fit, cannot be
tokenised or fails in any other way is recorded in the failures table, and the rest of the batch is
stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attribution import stage
from attribution.budget import (
    DEFAULT_BUDGET_SHARE,
    available_memory_bytes,
    budget_bytes,
    default_budget_bytes,
    frozen_prompt_bytes,
    ray_task_memory_bytes,
)
from attribution.config import AttentionAttributionConfig, AttributionStageConfig
from attribution.replacement import extract_weights
from attribution.stage import run
from attribution.store import open_store
from sparse_attention.config import ModelSpec
from sparse_attention.models import tiny_model
from tests.test_attribution import N_FEATURES, TINY, random_clt
from transcoders.clt import save_clt

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ["The cat sat on", "Hello world"]
LONG = "The cat sat on the mat. " * 40  # 961 tokens with the tiny tokenizer


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    save_clt(random_clt(TINY.n_layers, TINY.d_model, N_FEATURES, seed=0), root / "clt")
    return root, ModelSpec(name="tiny", tiny=TINY), root / "clt"


def config(**update) -> AttributionStageConfig:
    return AttributionStageConfig(attention=AttentionAttributionConfig(max_attention_edges=20), **update)


def test_a_prompt_over_the_budget_is_refused_and_the_batch_goes_on(sources, tmp_path):
    _, model, clt = sources
    weights = extract_weights(tiny_model(TINY)[0])
    budget_gb = 0.05
    assert frozen_prompt_bytes(weights, 961, N_FEATURES) > budget_gb * 2**30  # the long prompt cannot fit
    summary = run(config(memory_budget_gb=budget_gb), model, clt, [SHORT[0], LONG, SHORT[1]], tmp_path, "dense",
                  progress=False)
    assert [g["prompt"] for g in summary["graphs"]] == SHORT
    (failure,) = summary["failures"]
    assert (failure["prompt"], failure["error_type"]) == (LONG, "MemoryBudgetError")
    assert "over the memory budget of 0.05 GiB" in failure["error"]
    store = open_store(tmp_path)
    assert len(store.list_graphs()) == 2 and store.failures()["error_type"].tolist() == ["MemoryBudgetError"]
    assert all(len(store.load_graph(g["graph_id"]).head_loadings) for g in summary["graphs"])


def test_a_graph_does_not_depend_on_the_budget(sources, tmp_path):
    _, model, clt = sources
    small = run(config(memory_budget_gb=0.05), model, clt, SHORT[:1], tmp_path / "small", "dense", progress=False)
    large = run(config(), model, clt, SHORT[:1], tmp_path / "large", "dense", progress=False)
    assert small["graphs"][0]["graph_id"] == large["graphs"][0]["graph_id"]  # the budget is no graph setting
    tables = [open_store(tmp_path / name).load_graph(large["graphs"][0]["graph_id"]) for name in ("small", "large")]
    for name in ("head_loadings", "qk_pairs"):
        assert getattr(tables[0], name).drop(columns="graph_id").equals(getattr(tables[1], name).drop(columns="graph_id"))


def test_any_error_of_a_prompt_is_recorded_and_the_batch_goes_on(sources, tmp_path, monkeypatch):
    _, model, clt = sources
    surrogate = "a lone \ud800 surrogate"
    summary = run(config(), model, clt, [SHORT[0], surrogate, SHORT[1]], tmp_path, "dense", progress=False)
    assert [g["prompt"] for g in summary["graphs"]] == SHORT
    (failure,) = summary["failures"]
    assert failure["error_type"] == "TypeError" and failure["prompt"] == "a lone \\ud800 surrogate"
    store = open_store(tmp_path)
    assert store.failures()[["prompt", "error_type"]].values.tolist() == [["a lone \\ud800 surrogate", "TypeError"]]
    again = run(config(), model, clt, [SHORT[0], surrogate, SHORT[1]], tmp_path, "dense", progress=False)
    assert len(again["skipped"]) == 3 and not again["failures"]  # recorded: not retried on every rerun

    def out_of_memory(*args, **kwargs):
        raise MemoryError("simulated")

    monkeypatch.setattr(stage, "head_loadings", out_of_memory)
    forced = run(config(), model, clt, SHORT, tmp_path, "dense", progress=False, force=True)
    assert [(f["error_type"], f["error"]) for f in forced["failures"]] == [("MemoryError", "simulated")] * 2
    assert len(store.list_graphs()) == 0 and len(store.failures()) == 3  # forced failures replace the graphs


def test_budget_defaults_to_a_share_of_the_memory_available():
    assert budget_bytes(1.5) == int(1.5 * 2**30)
    assert ray_task_memory_bytes() is None  # not in a Ray task: the machine's memory alone
    available = available_memory_bytes()
    assert 0 < default_budget_bytes() <= DEFAULT_BUDGET_SHARE * available * 1.05
    with pytest.raises(ValueError, match="greater than 0"):
        AttributionStageConfig(memory_budget_gb=0)


def test_a_cgroup_limit_counts_its_working_set_not_its_page_cache(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 16777216 kB\nMemAvailable: 8388608 kB\n")  # 8 GiB available
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    assert available_memory_bytes(meminfo, cgroup) == 8 * 2**30  # no cgroup files: the machine's figure
    (cgroup / "memory.max").write_text(f"{4 * 2**30}\n")
    (cgroup / "memory.current").write_text(f"{3 * 2**30}\n")
    (cgroup / "memory.stat").write_text(f"anon {2**30}\ninactive_file {2 * 2**30}\nactive_file 0\n")
    assert available_memory_bytes(meminfo, cgroup) == 3 * 2**30  # 4 GiB limit, 1 GiB in use beyond the cache
    (cgroup / "memory.max").write_text("max\n")
    assert available_memory_bytes(meminfo, cgroup) == 8 * 2**30


MEASURE_PEAK = """
import json, sys
import torch
torch.set_num_threads(1)
from attribution.budget import frozen_prompt_bytes, graph_bytes
from attribution.config import GraphConfig
from attribution.graph import attribute
from attribution.nodes import build_replacement, transcoder_weights
from attribution.prune import prune
from attribution.records import edges_table, graphs_table
from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt
from sparse_attention.models import tiny_model
from tests.test_attribution import TINY
from transcoders.clt import load_clt

model, tokenizer = tiny_model(TINY)
weights = extract_weights(model)
clt = transcoder_weights(load_clt(sys.argv[1]), weights)
config = GraphConfig(max_feature_nodes=int(sys.argv[3]))


def step(prompt):
    lrm = build_replacement(weights, clt, freeze_prompt(model, tokenize_prompt(tokenizer, prompt)))
    graph = attribute(lrm, config)
    pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos, row_nodes=graph.row_nodes)
    graphs_table("g", "dense", graph, pruned, token_strings=[""] * graph.n_pos, model="", clt="", settings="",
                 edges_stored="all", seconds=0.0)
    edges_table("g", graph, pruned, "all")
    return lrm


def status_bytes(field):  # a memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), bytes
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


step("The cat sat on the mat.")  # warm-up: every lazily allocated buffer and import
open("/proc/self/clear_refs", "w").write("5")  # the peak restarts here: earlier transients do not count
before = status_bytes("VmRSS")
lrm = step(sys.argv[2])
peak = status_bytes("VmHWM")
estimate = frozen_prompt_bytes(weights, lrm.n_pos, clt.n_features) + graph_bytes(
    weights, lrm.n_pos, lrm.n_active, len(lrm.logit_tokens), config)
print(json.dumps({"added": peak - before, "estimate": estimate, "n_pos": lrm.n_pos, "n_active": lrm.n_active}))
"""


@pytest.mark.parametrize("max_feature_nodes", [64, 100_000])
def test_the_estimates_bound_the_memory_the_graph_takes(sources, max_feature_nodes):
    """Freezing a long prompt, its graph (capped, or every active feature), pruning and the stored tables,
    in a fresh process on the tiny model: the resident memory they add stays within the stage's estimates,
    and the estimates are not so loose that they would refuse prompts that fit several times over."""
    _, _, clt = sources
    root = Path(__file__).resolve().parent.parent
    prompt = "The cat sat on the mat. " * (30 if max_feature_nodes == 64 else 8)
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(clt), prompt, str(max_feature_nodes)],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["added"] <= measured["estimate"], measured
    assert measured["estimate"] <= 6 * max(measured["added"], 2**20 * 50), measured


MEASURE_QK_PEAK = """
import json, sys
import pandas as pd
import torch
torch.set_num_threads(1)
from attribution.config import AttentionAttributionConfig
from attribution.nodes import build_replacement, transcoder_weights
from attribution.qk import QKChunks, max_components, plan_qk_chunks, qk_attribution, qk_chunk_bytes, qk_output_bytes
from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt
from sparse_attention.config import TinyModelConfig
from sparse_attention.models import tiny_model
from tests.test_attribution import random_clt

n_layers, d_model = 6, 64
model, tokenizer = tiny_model(TinyModelConfig(n_layers=n_layers, d_model=d_model, n_heads=2, n_kv_heads=1, d_mlp=64,
                                              seed=1))
weights = extract_weights(model)
clt = transcoder_weights(random_clt(n_layers, d_model, 64, seed=0), weights)
lrm = build_replacement(weights, clt, freeze_prompt(model, tokenize_prompt(tokenizer, "The cat sat on the mat. " * 20)))
edges = [(layer, 0, q, q) for layer in range(n_layers) for q in range(1, lrm.n_pos, 2)]  # every other position
loadings = pd.DataFrame(edges, columns=["layer", "head", "query_pos", "key_pos"]).assign(weight=1.0)
config = AttentionAttributionConfig(max_attention_edges=len(edges))
output = qk_output_bytes(len(edges), config)
chunks = plan_qk_chunks(lrm, len(edges), int(sys.argv[1]), output)


def status_bytes(field):  # a memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), bytes
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


qk_attribution(lrm, loadings.head(4), config, chunks=QKChunks(2, 1, 1))  # warm-up
open("/proc/self/clear_refs", "w").write("5")  # the peak restarts here
before = status_bytes("VmRSS")
qk_attribution(lrm, loadings, config, chunks=chunks)
peak = status_bytes("VmHWM")
estimate = qk_chunk_bytes(chunks, max_components(lrm), lrm) + output
print(json.dumps({"added": peak - before, "estimate": estimate, "n_pos": lrm.n_pos, "n_active": lrm.n_active,
                  "cached_positions": chunks.cached_positions}))
"""


def test_the_qk_estimate_bounds_the_memory_qk_attribution_takes():
    """QK attribution in a fresh process on a tiny model with many active features per position (about 150 over
    6 layers: their decoder sums [n_f, d] are most of what a cached position holds): the resident memory it
    adds stays within its estimate and budget, and the estimate is not loose by more than 6x."""
    root = Path(__file__).resolve().parent.parent
    budget = 40 * 2**20
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE_QK_PEAK, str(budget)], capture_output=True, text=True,
                          env=env, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["cached_positions"] < measured["n_pos"] // 2  # the budget binds: not every position is cached
    assert measured["added"] <= measured["estimate"] <= budget, measured
    assert measured["estimate"] <= 6 * max(measured["added"], 2**20 * 10), measured
