"""Across recorded sparsify runs: does task behaviour follow the sparse model's KL to the original, its CE excess or
its sparsity? Reads every bench/results/sparsify_offset_scope_*.json run that holds both held-out comparisons and
task metrics, takes one corpus at one length (default brown at 512 tokens: held out from training's brown
documents), and ranks each task's logit-difference ratio (sparse / dense) against KL per token, CE excess and edge
fraction (Spearman's rho over runs, each run once: a file recorded twice with the same figures counts once).

    python bench/sparsify_kl_vs_tasks.py --source brown --length 512 --tag brown512

The runs are not independent (several branch from one run and share its first steps), so rho describes these runs,
not a population. Writes bench/results/sparsify_kl_vs_tasks_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MEASURES = ("kl_per_token", "ce_excess", "edge_fraction")


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions), from 1."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def collect(source: str, length: int) -> list[dict]:
    """One row per distinct run: its figures at (source, length) and its tasks' logit-difference ratios."""
    rows, seen = [], set()
    for path in sorted(RESULTS.glob("sparsify_offset_scope_*.json")):
        for run in json.loads(path.read_text()).get("runs", []):
            compared = [c for c in run.get("heldout_by_length", [])
                        if c["source"] == source and c["context_length"] == length and "kl_per_token" in c]
            tasks = {name: task["logit_diff_ratio"] for name, task in (run.get("tasks") or {}).items()
                     if isinstance(task, dict) and "logit_diff_ratio" in task}
            if not compared or not tasks:
                continue
            row = {"file": path.name, "steps": run.get("train_steps"), **{m: compared[0][m] for m in MEASURES},
                   "tasks": tasks}
            key = json.dumps({k: v for k, v in row.items() if k != "file"}, sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="brown")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    rows = collect(args.source, args.length)
    if len(rows) < 3:
        sys.exit(f"{len(rows)} runs hold {args.source} at {args.length} tokens and task metrics: too few to rank")
    task_names = sorted(set.intersection(*(set(row["tasks"]) for row in rows)))
    rho = {task: {m: spearman([row[m] for row in rows], [row["tasks"][task] for row in rows]) for m in MEASURES}
           for task in task_names}
    for row in sorted(rows, key=lambda r: r["kl_per_token"]):
        print(f"{row['file'][22:70]:48s} KL {row['kl_per_token']:.3f} CE {row['ce_excess']:+.3f} "
              f"open {row['edge_fraction']:.4f} " + " ".join(f"{t} {row['tasks'][t]:.2f}" for t in task_names))
    for task, by in rho.items():
        print(task, {m: round(v, 2) for m, v in by.items()})
    out = RESULTS / f"sparsify_kl_vs_tasks_{args.tag}.json"
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "source": args.source,
                               "length": args.length, "n_runs": len(rows), "spearman_rho": rho, "runs": rows},
                              indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
