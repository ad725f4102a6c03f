"""Sparse post-training of SmolLM2-135M: original, control and sparse CE, open-edge fraction (training length
and 512 tokens), tokens seen, wall time, peak memory and the curves, from one run of the demo preset's
sparsify stage (or any preset: --preset / --set).

    python bench/sparsify_smollm2.py                          # runs the stage into runs/bench-sparsify
    python bench/sparsify_smollm2.py --record runs/demo3     # records a finished pipeline run instead

Writes bench/results/sparsify_smollm2_<tag>.json and copies the run's training-curve and edge PNGs beside it.
Wall time is the stage's own (its manifest), peak memory the stage process's max RSS (metrics.json
`peak_rss_gb`; the stage runs in a Ray worker, not in this script's child).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for pipeline/run.py")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-sparsify")
    parser.add_argument("--record", type=Path, default=None, help="a finished pipeline output to record instead")
    parser.add_argument("--tag", default="demo")
    return parser.parse_args(argv)


def run_stage(args: argparse.Namespace) -> tuple[Path, dict]:
    """Run the sparsify stage in a child process; its wall time and max RSS are what this measures."""
    command = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--preset", args.preset, "--stages", "sparsify",
               "--output", str(args.output)] + [a for s in args.set for a in ("--set", s)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    return args.output, {"how": " ".join(["python"] + command[1:]), "command_wall_seconds": wall,
                         "load_average_at_start": load_before}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record is not None:
        output, measured = args.record, {"how": f"recorded from {args.record} (python bench/sparsify_smollm2.py "
                                                f"--record {args.record})"}
    else:
        output, measured = run_stage(args)
    stage_dir = output / "sparsify"
    try:
        metrics = json.loads((stage_dir / "metrics.json").read_text())
        manifest = json.loads((stage_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        sys.exit(f"no finished sparsify stage under {output}: {err}")
    config_text = (stage_dir / "sparsify_config.yaml").read_text()
    result = {
        **metrics,
        **measured,
        "stage_manifest_seconds": manifest["seconds"],
        "config": config_text,
        "load_average_at_end": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sparsify_smollm2_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    for png, suffix in (("training_curves.png", "curves"), ("edge_fractions.png", "edges")):
        if (stage_dir / png).exists():
            shutil.copyfile(stage_dir / png, RESULTS / f"sparsify_smollm2_{args.tag}_{suffix}.png")
    print(f"{out}: dense CE {metrics['dense_ce']:.4f}, sparse {metrics['sparse_ce']:.4f}, control "
          f"{metrics['control_ce']:.4f}, edges open {metrics['edge_fraction']:.4f} at {metrics['context_length']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
