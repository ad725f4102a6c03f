"""The per-prompt step under a memory budget and under errors: a prompt that cannot fit, cannot be
tokenised or fails in any other way is recorded in the failures table, and the rest of the batch is
stored."""

from __future__ import annotations

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
