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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, not the repository root
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from bench._pipeline import run_or_record, stage_run_parser  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = stage_run_parser(__doc__, ROOT / "runs" / "bench-sparsify", "a finished pipeline output to record instead")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output, measured = run_or_record(args, "sparsify", f"python bench/sparsify_smollm2.py --record {args.record}")
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
