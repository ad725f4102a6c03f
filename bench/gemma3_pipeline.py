"""The gemma3 preset's results, from a finished run: each stage's wall time (its manifest), sparsify (edges open at
each held-out length, CE of the original, the sparse model and the control), both CLTs (nMSE, L0, dead features,
CE recovered), seconds per graph and graph sizes, and what compare left out.

    python pipeline/run.py --preset gemma3 --output /work/runs/gemma3          # the run (nice 5, embedded Ray)
    python bench/gemma3_pipeline.py --record /work/runs/gemma3 --how "..."     # this record

Writes bench/results/gemma3_pipeline.json. Wall times depend on the machine's load (the run's load samples
are passed with --load-log: lines 'HH:MM:SS load1 ...' written while it ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attribution.store import open_store  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STAGE_DIRS = {"sparsify": "sparsify", "clt_dense": "clt/dense", "clt_sparse": "clt/sparse",
              "features_dense": "clt/dense/features", "features_sparse": "clt/sparse/features",
              "attribution_dense": "graphs/dense", "attribution_sparse": "graphs/sparse", "compare": "comparison"}


def manifests(run: Path) -> dict:
    """Stage name -> seconds from every manifest.json under the run (the stage's own wall time)."""
    found = {}
    for path in sorted(run.rglob("manifest.json")):
        manifest = json.loads(path.read_text())
        name = manifest.get("stage", str(path.parent.relative_to(run)))
        found[f"{name} ({path.parent.relative_to(run)})"] = manifest.get("seconds")
    return found


def sparsify_summary(run: Path) -> dict:
    metrics = json.loads((run / "sparsify" / "metrics.json").read_text())
    by_length = [{key: section.get(key) for key in ("source", "context_length", "blocks", "original_ce", "sparse_ce",
                                                    "kl_per_token", "edge_fraction", "open_keys_per_query")
                  if key in section} for section in metrics.get("heldout_by_length", [])]
    keep = ("dense_ce", "sparse_ce", "control_ce", "untrained_ce", "edge_fraction", "context_length", "offset_init",
            "steps", "tokens_seen", "peak_rss_gb", "tasks", "open_heads")
    return {**{key: metrics[key] for key in keep if key in metrics}, "heldout_by_length": by_length}


def clt_summary(directory: Path) -> dict:
    metrics = json.loads((directory / "metrics.json").read_text())
    metrics.pop("history", None)
    return metrics


def graph_summary(run: Path) -> dict:
    graphs = open_store(run / "graphs").list_graphs()
    columns = [c for c in ("variant", "task", "prompt", "n_pos", "n_features_active", "n_feature_nodes", "n_edges_kept",
                           "replacement_score", "completeness_score", "seconds") if c in graphs.columns]
    per_variant = {variant: {"graphs": len(part), "mean_seconds": float(part["seconds"].mean()),
                             "max_seconds": float(part["seconds"].max()),
                             "mean_replacement_score": float(part["replacement_score"].mean()),
                             "mean_completeness_score": float(part["completeness_score"].mean())}
                   for variant, part in graphs.groupby("variant")}
    return {"per_variant": per_variant, "graphs": graphs[columns].to_dict(orient="records")}


def load_samples(path: Path | None) -> dict | None:
    """Min / median / max of the 1-minute load average sampled while the run went, and the peak RSS of its Ray
    stage workers (the sampler's lines: time, load, pid, RSS 'x.yGB', process name)."""
    if path is None:
        return None
    loads, rss = [], {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 5:
            continue
        loads.append(float(parts[1]))
        if parts[4].startswith("ray::stage"):
            stage = parts[4].removeprefix("ray::stage:")
            rss[stage] = max(rss.get(stage, 0.0), float(parts[3].removesuffix("GB")))
    loads.sort()
    return {"samples": len(loads), "load1_min": loads[0], "load1_median": loads[len(loads) // 2], "load1_max": loads[-1],
            "peak_rss_gb_by_stage_worker": rss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=Path, required=True, help="a finished `--preset gemma3` output")
    parser.add_argument("--how", required=True, help="the command that produced the run, and when")
    parser.add_argument("--load-log", type=Path, help="load / RSS samples taken while the run went")
    parser.add_argument("--output", type=Path, default=RESULTS / "gemma3_pipeline.json")
    args = parser.parse_args(argv)
    run = args.record
    compare_manifest = json.loads((run / "comparison" / "manifest.json").read_text())
    result = {
        "how": args.how,
        "record_command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared with other jobs",
        "load_while_running": load_samples(args.load_log),
        "stage_seconds": manifests(run),
        "sparsify": sparsify_summary(run),
        "clt": {variant: clt_summary(run / "clt" / variant) for variant in ("dense", "sparse")},
        "attribution": graph_summary(run),
        "compare": compare_manifest.get("summary"),
        "config": (run / "sparsify" / "sparsify_config.yaml").read_text(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
