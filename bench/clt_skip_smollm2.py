"""CLT skip path on SmolLM2-135M (dense): the same small budget with the skip path off, on (W_skip from 0) and
on with the least-squares init; held-out nMSE, L0, CE recovered and wall time of each.

    python bench/clt_skip_smollm2.py run --variant off            # one CLT into runs/bench-clt-skip/off
    python bench/clt_skip_smollm2.py run --variant zero
    python bench/clt_skip_smollm2.py run --variant least_squares
    python bench/clt_skip_smollm2.py collect --tag steps60        # bench/results/clt_skip_smollm2_steps60.json

Each run is the CLT stage (transcoders.stage.run) with the demo preset's CLT settings but `--steps` steps and
16 normalisation batches (the least-squares fit needs more tokens than d_model), one torch thread; `run`
records its command and the load average before and after beside the stage's metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, not the repository root
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
VARIANTS = {"off": {"skip": False}, "zero": {"skip": True, "skip_init": "zero"},
            "least_squares": {"skip": True, "skip_init": "least_squares"}}


def stage_config(variant: str, steps: int):
    from transcoders.config import CLTStageConfig

    options = VARIANTS[variant]
    return CLTStageConfig.model_validate({
        "data": {"source": "python-docs", "context_length": 128},
        "clt": {"n_features": 512, "skip": options["skip"]},
        "harvest": {"batch_size": 4, "buffer_tokens": 4096, "reuse": 2},
        "train": {"steps": steps, "batch_tokens": 256, "lr": 0.001, "warmup_steps": 10,
                  "sparsity_coefficient": 0.005, "sparsity_ramp_fraction": 0.5, "checkpoint_every": 1000,
                  "normalisation_batches": 16, "threads": 1, "skip_init": options.get("skip_init", "zero")},
        "eval": {"heldout_blocks": 12, "batch_size": 4},
    })


def run(args: argparse.Namespace) -> None:
    import torch

    from sparse_attention.config import ModelSpec
    from transcoders import stage

    torch.set_num_threads(1)
    load_before, started = os.getloadavg(), time.perf_counter()
    output = args.output / args.variant
    metrics = stage.run(stage_config(args.variant, args.steps), ModelSpec(name="smollm2-135m"), output, progress=False)
    metrics.pop("history", None)
    record = {"command": f"nice -n 5 python bench/clt_skip_smollm2.py run --variant {args.variant} --steps {args.steps}",
              "wall_seconds": time.perf_counter() - started, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "metrics": metrics}
    (output / "bench_record.json").write_text(json.dumps(record, indent=1))


def collect(args: argparse.Namespace) -> None:
    result = {"what": __doc__.splitlines()[0], "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "variants": {}}
    for variant in VARIANTS:
        path = args.output / variant / "bench_record.json"
        if path.exists():
            record = json.loads(path.read_text())
            m = record["metrics"]
            record["summary"] = {key: m[key] for key in ("nmse", "l0", "dead_fraction", "ce_recovered_fraction",
                                                          "train_wall_seconds", "clt_parameters")}
            result["variants"][variant] = record
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"clt_skip_smollm2_{args.tag}.json").write_text(json.dumps(result, indent=1))
    for variant, record in result["variants"].items():
        print(variant, record["summary"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "collect"])
    parser.add_argument("--variant", choices=list(VARIANTS), default="off")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-clt-skip")
    parser.add_argument("--tag", default="steps60")
    args = parser.parse_args(argv)
    run(args) if args.action == "run" else collect(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
