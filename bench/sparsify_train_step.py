"""Wall time of one sparsify training step (the stage's own `post_train`: noisy-gate forward and backward, the
frozen original's forward, the hard-gate forward the controller reads) on SmolLM2 at each batch x context shape,
to size runs. One thread by default; the first step (allocation warm-up) is reported apart.

    python bench/sparsify_train_step.py --shapes 1x512 4x128 --steps 4

Writes bench/results/sparsify_train_step_<tag>.json with the command and the load average.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from sparse_attention.config import SparsifyConfig  # noqa: E402
from sparse_attention.data import DataConfig, load_token_blocks  # noqa: E402
from sparse_attention.gated_attention import GatedModel  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402
from sparse_attention.train import post_train  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def shape(text: str) -> tuple[int, int]:
    batch, _, context = text.partition("x")
    if not (batch.isdigit() and context.isdigit()):
        raise argparse.ArgumentTypeError(f"a shape is BATCHxCONTEXT, e.g. 4x128, not {text!r}")
    return int(batch), int(context)


def step_seconds(model, tokenizer, batch: int, context: int, steps: int, config: SparsifyConfig) -> list[float]:
    """Seconds of each of `steps` post-training steps of a fresh gated copy of `model` on `batch` x `context`."""
    blocks = load_token_blocks(config.data.model_copy(update={"max_train_tokens": 200_000}), tokenizer, context).train
    gated = GatedModel(copy.deepcopy(model), offset_init=4.0, learn_offset=True, offset_scope=config.gate.offset_scope)
    train = config.train.model_copy(update={"steps": steps, "batch_size": batch, "checkpoint_every": 10 * steps})
    stamps = [time.perf_counter()]
    post_train(gated, model, blocks, train, config.controller, learn_offset=True, progress=False,
               on_step=lambda row: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", type=shape, default=[(1, 512), (4, 128)])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tag", default="smollm2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SparsifyConfig(data=DataConfig(source="python-docs"),
                            train={"precision": args.precision, "threads": args.threads, "constraint": "ce_excess"})
    model, tokenizer = load_model(config.model.name)
    model.eval()
    result = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "threads": args.threads, "precision": args.precision,
              "controller_signal": config.train.controller_signal, "shapes": []}
    for batch, context in args.shapes:
        load_before = os.getloadavg()
        seconds = step_seconds(model, tokenizer, batch, context, args.steps, config)
        result["shapes"].append({"batch": batch, "context": context, "tokens_per_step": batch * context,
                                 "first_step_seconds": seconds[0],
                                 "median_later_step_seconds": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
                                 "step_seconds": seconds, "load_average_before": load_before,
                                 "load_average_after": os.getloadavg()})
        print(json.dumps(result["shapes"][-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sparsify_train_step_{args.tag}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
