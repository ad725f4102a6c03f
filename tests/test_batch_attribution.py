"""Batch attribution in the pipeline: a run SIGKILLed mid-batch and rerun recomputes no finished prompt and
ends with the store of an uninterrupted run; two workers (the stage task and an actor, or two actors)
complete a partial store to the same graphs. Sparsify and CLT run once (tiny, few steps); graph ids depend
on their paths, so every run here writes into the same output root."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray

from attribution.store import open_store
from pipeline import attribution_pool
from pipeline.config import StageResources, load_config
from pipeline.orchestrate import init_ray, run_pipeline

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "pipeline" / "run.py")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
OVERRIDES = ["sparsify.train.steps=10", "sparsify.eval.long_blocks=0", "clt.train.steps=30",
             "attribution.prompt_sets={antonyms: 8, induction: 8}", "attribution.prompts=['', 'Hello world']"]
N_GRAPHS, N_FAILURES = 17, 1  # per variant: the empty prompt cannot be attributed


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(output root, reference store directory): sparsify and CLTs done, the batch attributed uninterrupted."""
    root = tmp_path_factory.mktemp("batch")
    config = load_config(preset="tiny", overrides=OVERRIDES)
    run_pipeline(config, ["sparsify", "clt", "attribution"], str(root), executor="local", progress=False)
    reference = root.parent / f"{root.name}_reference"
    shutil.move(root / "graphs", reference)
    store = open_store(reference)
    assert len(store.list_graphs()) == 2 * N_GRAPHS and len(store.failures()) == 2 * N_FAILURES
    return root, reference


def committed_files(store_dir: Path) -> dict[Path, int]:
    """mtime of every file of every committed graph, and of every recorded failure."""
    store = open_store(store_dir)
    files = {}
    for graph in store.list_graphs().itertuples():
        for table in ("graphs", "nodes", "edges", "head_loadings", "qk_pairs"):
            path = Path(store.path(table, graph.variant, graph.graph_id))
            files[path] = path.stat().st_mtime_ns
    for path in (store_dir / "failures").rglob("*.parquet"):
        files[path] = path.stat().st_mtime_ns
    return files


def assert_same_store(store_dir: Path, reference_dir: Path) -> None:
    store, reference = open_store(store_dir), open_store(reference_dir)
    graphs, expected = store.list_graphs(), reference.list_graphs()
    assert sorted(graphs["graph_id"]) == sorted(expected["graph_id"])
    assert sorted(store.failures()["failure_id"]) == sorted(reference.failures()["failure_id"])
    for graph_id in expected["graph_id"]:
        edges, want = (s.read_table("edges", graph_id).sort_values(["target", "source"]).reset_index(drop=True)
                       for s in (store, reference))
        pd.testing.assert_frame_equal(edges, want, check_exact=False, rtol=1e-5, atol=1e-7)


def test_kill_mid_batch_then_rerun_recomputes_no_finished_prompt(built):
    root, reference = built
    shutil.rmtree(root / "graphs", ignore_errors=True)
    command = RUN + ["--preset", "tiny", "--stages", "attribution", "--executor", "local", "--quiet",
                     "--output", str(root)] + [arg for override in OVERRIDES for arg in ("--set", override)]
    killed = subprocess.Popen(command, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    dense = root / "graphs" / "graphs" / "variant=dense"
    deadline = time.time() + 180
    while len(list(dense.glob("*.parquet"))) < 3 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    finished = committed_files(root / "graphs")
    n_finished = len(open_store(root / "graphs").list_graphs())
    assert 3 <= n_finished < 2 * N_GRAPHS, f"the kill came outside the batch ({n_finished} graphs finished)"
    assert not (root / "graphs" / "_stages" / "dense" / "manifest.json").exists()

    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
    assert_same_store(root / "graphs", reference)


def partial_copy(root: Path, reference: Path) -> dict[Path, int]:
    """The reference store in root/graphs with every other graph deleted; the mtimes of what is left."""
    shutil.rmtree(root / "graphs", ignore_errors=True)
    shutil.copytree(reference, root / "graphs", ignore=shutil.ignore_patterns("_stages"))
    store = open_store(root / "graphs")
    for graph_id in store.list_graphs()["graph_id"].tolist()[::2]:  # half of each variant is left to compute
        store.delete(graph_id)
    return committed_files(root / "graphs")


def test_two_workers_complete_a_partial_store(built, monkeypatch):
    """num_workers: 2 in the pipeline (two stages on a 2-CPU Ray: each stage task works, an actor would only
    start for a longer batch), then outside it the actors alone (work_here=False, dense) and this process with
    an actor started after its first prompt (sparse): each completes a partial store to the reference graphs
    without recomputing a stored one."""
    root, reference = built
    kept = partial_copy(root, reference)
    config = load_config(preset="tiny", overrides=OVERRIDES + ["resources.stages.attribution.num_workers=2"])
    assert init_ray(config)
    try:
        results = run_pipeline(config, ["attribution"], str(root), progress=False)  # embedded Ray
        for variant in ("dense", "sparse"):
            summary = results[f"attribution_{variant}"]["summary"]
            assert summary["workers"] in (1, 2), summary
            assert summary["graphs"] + summary["skipped"] == N_GRAPHS + N_FAILURES and summary["graphs"] > 0
            assert summary["failures"] == [] and summary["failures_in_store"] == N_FAILURES
        for path, mtime in kept.items():
            assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
        assert_same_store(root / "graphs", reference)

        kept = partial_copy(root, reference)
        monkeypatch.setattr(attribution_pool, "ACTOR_START_SECONDS", 0.0)
        for variant, work_here in (("dense", False), ("sparse", True)):
            source = config.sparsify.model if variant == "dense" else root / "sparsify" / "model"
            summary = attribution_pool.run_on_actors(config.attribution, source, root / "clt" / variant,
                                                     root / "graphs", variant, StageResources(num_cpus=1, num_workers=2),
                                                     progress=False, work_here=work_here)
            assert (os.getpid() in summary["worker_pids"]) == work_here and len(summary["worker_pids"]) <= 2, summary
            assert len(summary["graphs"]) + len(summary["skipped"]) == N_GRAPHS + N_FAILURES, summary
        for path, mtime in kept.items():
            assert path.stat().st_mtime_ns == mtime, f"{path} was recomputed"
        assert_same_store(root / "graphs", reference)
    finally:
        ray.shutdown()
