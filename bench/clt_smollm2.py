"""Cross-layer transcoders on SmolLM2-135M, dense and sparse: nMSE, L0, dead fraction, CE recovered, tokens,
wall time and peak memory, from one run of the demo preset's clt stage (or any preset: --preset / --set).

    python bench/clt_smollm2.py                         # runs sparsify (if not done) + clt into runs/bench-clt
    python bench/clt_smollm2.py --record runs/demo3     # records a finished pipeline run instead
    python bench/clt_smollm2.py --record runs/clt-long1200/dense --variants dense --tag long1200  # one CLT dir

Writes bench/results/clt_smollm2_<tag>.json (per variant: the stage's metrics without the training history,
its config, and the goal checks) and copies each CLT's per-layer and training-curve PNGs beside it. Wall
time is the stage's own (metrics.json), peak memory its process's max RSS (`peak_rss_gb`, recorded by the
stage since 2026-11-23; None for older runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, not the repository root
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from bench._pipeline import run_or_record, stage_run_parser  # noqa: E402

# The goal for the demo budget (long-run figures are in bench/results/clt_smollm2_long1200*.json)
GOAL = {"nmse_max": 0.15, "l0_max": 32.0, "ce_recovered_min": 0.80}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = stage_run_parser(__doc__, ROOT / "runs" / "bench-clt", "a finished pipeline output (its clt/<variant>/) "
                              "or, with one --variants, a CLT directory")
    parser.add_argument("--variants", nargs="+", default=["dense", "sparse"])
    return parser.parse_args(argv)


def clt_dir(output: Path, variant: str, n_variants: int) -> Path:
    nested = output / "clt" / variant
    return nested if nested.is_dir() or n_variants > 1 else output


def summarise(directory: Path) -> dict:
    """The CLT stage's metrics (history dropped, kept in the run) with its config and the goal checks."""
    try:
        metrics = json.loads((directory / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        sys.exit(f"no finished CLT under {directory}: {err}")
    metrics.pop("history", None)
    config = directory / "clt_config.yaml"
    return {
        **metrics,
        "peak_rss_gb": metrics.get("peak_rss_gb"),
        "config": config.read_text() if config.exists() else None,
        "goal": GOAL,
        "goal_met": {
            "nmse": metrics["nmse"] <= GOAL["nmse_max"],
            "l0": metrics["l0"] <= GOAL["l0_max"],
            "ce_recovered": metrics["ce_recovered_fraction"] >= GOAL["ce_recovered_min"],
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output, measured = run_or_record(args, "sparsify,clt",  # sparsify skips when done
                                     f"python bench/clt_smollm2.py --record {args.record} --variants "
                                     f"{' '.join(args.variants)} --tag {args.tag}")
    result = {**measured, "variants": {}, "load_average_at_end": os.getloadavg(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        directory = clt_dir(output, variant, len(args.variants))
        result["variants"][variant] = summarise(directory)
        for png in ("per_layer.png", "training_curves.png"):
            if (directory / png).exists():
                shutil.copyfile(directory / png, RESULTS / f"clt_smollm2_{args.tag}_{variant}_{Path(png).stem}.png")
        m = result["variants"][variant]
        print(f"{variant}: nMSE {m['nmse']:.3f}, L0 {m['l0']:.1f}, dead {m['dead_fraction']:.3f}, CE recovered "
              f"{m['ce_recovered_fraction']:.3f}, {m['train_tokens_seen']} tokens, {m['stage_wall_seconds'] / 60:.1f} min")
    out = RESULTS / f"clt_smollm2_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
