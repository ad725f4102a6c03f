"""Batch attribution throughput on the tiny preset's models: the stage function in-process vs the Ray
actor pool with 1 and 2 workers, on the same 32 prompts (8 from each of four prompt sets).

    python bench/pipeline_attribution.py [--repeats 2]

Every measurement attributes the whole batch into a fresh store and includes loading the model and CLT
(in-process, or in each actor). Ray starts once (embedded, 2 CPUs) before the timings; its start is
reported apart. `ray_task` is the pipeline's one-worker path (the same loop inside one Ray task);
`ray_N_worker(s)` the actor pool. "steady" rates leave out the time to the first finished prompt
(loading, actor start), i.e. what a long batch converges to. Runs alternate and the median repeat
counts, since other jobs share the CPU; the load average is recorded before and after. Also measured:
one actor's start (process, imports, model and CLT load, one call), the fixed cost the actor pool pays
per batch. Writes bench/results/pipeline_attribution.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

from attribution import stage as attribution  # noqa: E402
from pipeline.attribution_pool import AttributionWorker, run_on_actors  # noqa: E402
from pipeline.config import StageResources, load_config  # noqa: E402
from pipeline.orchestrate import run_pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_attribution.json"
PROMPT_SETS = "{ioi: 8, greater_than: 8, antonyms: 8, induction: 8}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", choices=("dense", "sparse"), default="sparse")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    config = load_config(preset="tiny", overrides=[f"attribution.prompt_sets={PROMPT_SETS}", "attribution.prompts=[]"])
    stage_config = config.attribution
    n_prompts = len(attribution.prompt_items(stage_config))
    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_attribution_"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    run_pipeline(config, ["sparsify", "clt"], str(work), executor="local", progress=False)
    setup_seconds = time.perf_counter() - started
    source = config.sparsify.model if args.variant == "dense" else work / "sparsify" / "model"
    clt_dir = work / "clt" / args.variant

    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    ray_init_seconds = time.perf_counter() - started

    def direct(store: Path) -> dict:
        return attribution.run(stage_config, source, clt_dir, None, store, args.variant, progress=False)

    def ray_task(store: Path) -> dict:  # what the pipeline runs with num_workers: 1 (the loop in one Ray task)
        remote = ray.remote(attribution.run).options(num_cpus=1)
        return ray.get(remote.remote(stage_config, source, clt_dir, None, store, args.variant, progress=False))

    def on_ray(workers: int):
        def measure(store: Path) -> dict:
            return run_on_actors(stage_config, source, clt_dir, store, args.variant,
                                 StageResources(num_cpus=1, num_workers=workers), progress=False)
        return measure

    paths = {"direct": direct, "ray_task": ray_task, "ray_1_worker": on_ray(1), "ray_2_workers": on_ray(2)}
    runs: dict[str, list[dict]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name, measure in paths.items():
            store = work / f"graphs_{name}_{repeat}"
            started = time.perf_counter()
            summary = measure(store)
            seconds = time.perf_counter() - started
            assert len(summary["graphs"]) == n_prompts, summary["failures"]
            first = summary["first_result_seconds"]
            runs[name].append({"seconds": seconds, "prompts_per_s": n_prompts / seconds, "first_result_seconds": first,
                               "steady_prompts_per_s": (n_prompts - 1) / max(1e-9, summary["seconds"] - first),
                               "graph_seconds_sum": sum(g["seconds"] for g in summary["graphs"]),
                               "workers": summary["workers"], "load_avg_1min": os.getloadavg()[0]})
            print(f"{name:>14} repeat {repeat}: {seconds:.2f} s, {n_prompts / seconds:.2f} prompts/s", flush=True)

    # one actor's start: process, imports, model and CLT load, then one call on a prompt already stored
    store = work / "graphs_direct_0"
    item = attribution.prompt_items(stage_config)[0]
    started = time.perf_counter()
    worker = ray.remote(AttributionWorker).options(num_cpus=1).remote(stage_config, source, str(clt_dir), str(store),
                                                                      args.variant, 1)
    assert ray.get(worker.attribute.remote(item, False))["status"] == "skipped"
    actor_start_seconds = time.perf_counter() - started
    ray.kill(worker)
    ray.shutdown()

    median = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    steady = {name: statistics.median(r["steady_prompts_per_s"] for r in rs) for name, rs in runs.items()}
    result = {
        "what": f"batch attribution of {n_prompts} prompts ({PROMPT_SETS}) on the tiny preset's {args.variant} model "
                "and CLT, model load included, each run into a fresh store; medians over repeats",
        "prompts": n_prompts,
        "variant": args.variant,
        "median_seconds": median,
        "prompts_per_s": {name: n_prompts / s for name, s in median.items()},
        "scaling_2_vs_1_workers": median["ray_1_worker"] / median["ray_2_workers"],
        "ray_overhead_1_worker_vs_direct": median["ray_1_worker"] / median["direct"] - 1,
        "ray_overhead_task_vs_direct": median["ray_task"] / median["direct"] - 1,
        "steady_prompts_per_s": steady,
        "steady_scaling_2_vs_1_workers": steady["ray_2_workers"] / steady["ray_1_worker"],
        "steady_overhead_1_worker_vs_direct": steady["direct"] / steady["ray_1_worker"] - 1,
        "ray_overhead_target": 0.10,
        "actor_start_seconds": actor_start_seconds,
        "ray_init_seconds": ray_init_seconds,
        "setup_seconds_sparsify_and_clt": setup_seconds,
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "torch_threads_per_worker": 1, "ray_num_cpus": 2,
                    "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                    "platform": platform.platform(), "torch": torch.__version__, "ray": ray.__version__},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("prompts_per_s", "scaling_2_vs_1_workers", "ray_overhead_1_worker_vs_direct",
                                             "ray_overhead_task_vs_direct", "steady_prompts_per_s",
                                             "steady_scaling_2_vs_1_workers", "steady_overhead_1_worker_vs_direct",
                                             "actor_start_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
