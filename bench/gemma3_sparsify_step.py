"""Seconds of one sparsify training step on Gemma-3-270M at each batch x context shape, to size the gemma3
preset: the stage's own `post_train` (noisy-gate forward and backward, the frozen original's forward, the
hard-gate forward the controller reads), bf16, one thread; the first step (allocation warm-up) apart.

    python bench/gemma3_sparsify_step.py --shapes 2x128 4x128 1x512 --steps 3

Writes bench/results/gemma3_sparsify_step.json with the command, peak RSS and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.sparsify_train_step import shape, step_seconds  # noqa: E402
from runtime.resources import peak_rss_gb  # noqa: E402
from sparse_attention.config import SparsifyConfig  # noqa: E402
from sparse_attention.data import DataConfig  # noqa: E402
from sparse_attention.models import GEMMA3_NAME, load_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=shape, default=[(2, 128), (4, 128), (1, 512)])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS / "gemma3_sparsify_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SparsifyConfig(model={"name": GEMMA3_NAME}, data=DataConfig(source="python-docs"),
                            train={"precision": args.precision, "threads": args.threads, "constraint": "ce_excess",
                                   "trainable": "attention"})
    started = time.perf_counter()
    model, tokenizer = load_model(GEMMA3_NAME)
    model.eval()
    result = {"command": "python " + " ".join(sys.argv), "model": GEMMA3_NAME, "cpus": os.cpu_count(),
              "threads": args.threads, "precision": args.precision, "trainable": "attention",
              "load_seconds": time.perf_counter() - started, "shapes": []}
    for batch, context in args.shapes:
        load_before = os.getloadavg()
        cpu = time.process_time()
        seconds = step_seconds(model, tokenizer, batch, context, args.steps, config)
        result["shapes"].append({"batch": batch, "context": context, "tokens_per_step": batch * context,
                                 "first_step_seconds": seconds[0],
                                 "median_later_step_seconds": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
                                 "step_seconds": seconds, "cpu_seconds_all_steps": time.process_time() - cpu,
                                 "load_average_before": load_before, "load_average_after": os.getloadavg(),
                                 "peak_rss_gb_so_far": peak_rss_gb()})
        print(json.dumps(result["shapes"][-1]), flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")  # after every shape: a stopped run keeps its own
    return 0


if __name__ == "__main__":
    sys.exit(main())
