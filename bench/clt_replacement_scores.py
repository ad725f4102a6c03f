"""Replacement and completeness scores of attribution graphs built with given CLTs: the demo preset's prompts
(its `attribution` section: free prompts and prompt sets) attributed with each CLT, graphs only (no head
loadings: they do not change the scores), then the scores per variant and per task from the store.

    python bench/clt_replacement_scores.py --store runs/rs/graphs --tag demo_skip \\
        --dense runs/x/clt/dense --sparse-model runs/x/sparsify/model --sparse runs/x/clt/sparse

Each variant runs `python -m cli attribute` (one thread) into the store, so graphs already there are not
recomputed; `--record` only reads the store. Writes bench/results/clt_replacement_scores_<tag>.json: the
commands, each CLT's held-out metrics (its metrics.json), per variant the mean, median, min and max of
replacement_score, completeness_score and their pruned forms over the graphs, and the same means per task.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, not the repository root
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

CLT_METRICS = ["nmse", "l0", "dead_fraction", "ce_recovered_fraction", "train_steps", "train_tokens_seen",
               "train_cpu_seconds", "stage_wall_seconds"]


def attribute_command(args: argparse.Namespace, variant: str) -> list[str]:
    model = ["--model", "smollm2-135m"] if variant == "dense" else ["--gated-checkpoint", str(args.sparse_model)]
    clt = args.dense if variant == "dense" else args.sparse
    return [sys.executable, "-m", "cli", "attribute", *model, "--clt", str(clt), "--variant", variant,
            "--store", str(args.store), "--config", str(ROOT / "pipeline" / "presets" / f"{args.preset}.yaml"),
            "--no-attention", "--threads", "1", "--quiet"]


def summarise(store: Path, variant: str) -> dict:
    from attribution.store import open_store
    from comparison.graph_metrics import GRAPH_SCORES

    graphs = open_store(store).list_graphs(variant)
    if graphs.empty:
        sys.exit(f"no {variant} graphs in {store}")
    scores = graphs[list(GRAPH_SCORES)].astype(float)
    return {
        "n_graphs": len(graphs),
        **{score: {"mean": scores[score].mean(), "median": scores[score].median(), "min": scores[score].min(),
                   "max": scores[score].max()} for score in GRAPH_SCORES},
        "by_task": {str(task): {"n": len(rows), **{score: rows[score].astype(float).mean() for score in GRAPH_SCORES}}
                    for task, rows in graphs.groupby("task")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--dense", type=Path, help="the dense model's CLT directory")
    parser.add_argument("--sparse", type=Path, help="the sparse model's CLT directory")
    parser.add_argument("--sparse-model", type=Path, help="the gated checkpoint (a sparsify stage's model/)")
    parser.add_argument("--preset", default="demo", help="whose attribution section gives prompts and settings")
    parser.add_argument("--record", action="store_true", help="only read the store")
    parser.add_argument("--tag", default="demo")
    args = parser.parse_args()
    variants = [v for v in ("dense", "sparse") if getattr(args, v) is not None]
    if not variants:
        parser.error("give --dense and/or --sparse")
    if args.sparse is not None and args.sparse_model is None:
        parser.error("--sparse needs --sparse-model (the gated model its CLT was trained on)")
    result: dict = {"command": "python " + " ".join(sys.argv), "machine": {"cpus": os.cpu_count()}, "variants": {}}
    for variant in variants:
        entry: dict = {"clt": str(getattr(args, variant))}
        metrics_file = getattr(args, variant) / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            entry["clt_metrics"] = {key: metrics.get(key) for key in CLT_METRICS}
        if not args.record:
            command = attribute_command(args, variant)
            entry["attribute_command"] = " ".join(["python", *command[1:]])
            load, started, cpu = os.getloadavg(), time.perf_counter(), os.times()
            completed = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            after = os.times()
            entry.update(wall_seconds=time.perf_counter() - started, exit_status=completed.returncode,
                         cpu_seconds=(after.children_user + after.children_system)
                         - (cpu.children_user + cpu.children_system), load_average_at_start=load)
        entry.update(summarise(args.store, variant))
        result["variants"][variant] = entry
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"clt_replacement_scores_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
