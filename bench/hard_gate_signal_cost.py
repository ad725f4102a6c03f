"""Cost of the deterministic-gate controller signal: seconds per training step with train.controller_signal
'hard_gates' (one extra no-grad hard-gate forward per batch) vs 'train_gates', on the same batches.

Writes bench/results/hard_gate_signal_cost_<model>.json.
Usage: python bench/hard_gate_signal_cost.py [--model tiny|smollm2-135m] [--batch 1] [--context 512] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from sparse_attention.config import TrainConfig
from sparse_attention.constraint import ControllerConfig
from sparse_attention.data import DataConfig, load_token_blocks
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import TinyModelConfig, load_model
from sparse_attention.train import post_train

RESULTS = Path(__file__).resolve().parent / "results"


def step_seconds(model, blocks: torch.Tensor, signal: str, args) -> list[float]:
    """Seconds of each training step (the first, a warm-up, dropped) with the given controller signal."""
    reference = copy.deepcopy(model).eval()
    gated = GatedModel(copy.deepcopy(model), offset_init=4.0)
    train = TrainConfig(steps=args.steps + 1, batch_size=args.batch, warmup_steps=0, constraint="ce_excess",
                        controller_signal=signal, checkpoint_every=10_000)
    with tempfile.TemporaryDirectory() as tmp:
        result = post_train(gated, reference, blocks, train, ControllerConfig(), learn_offset=True,
                            checkpoint_dir=Path(tmp), progress=False)
    elapsed = [row["seconds"] for row in result.history]  # since the loop started
    return [after - before for before, after in zip(elapsed, elapsed[1:])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = TinyModelConfig() if args.model == "tiny" else None
    model, tokenizer = load_model(args.model, tiny=tiny)
    data = DataConfig(context_length=args.context, max_train_tokens=args.context * args.batch * (args.steps + 2) * 2,
                      max_heldout_tokens=args.context * 2)
    blocks = load_token_blocks(data, tokenizer).train
    seconds = {signal: step_seconds(model, blocks, signal, args) for signal in ("train_gates", "hard_gates")}
    medians = {signal: statistics.median(s) for signal, s in seconds.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "model": args.model, "batch": args.batch, "context_length": args.context, "threads": args.threads,
        "seconds_per_step": seconds, "median_seconds_per_step": medians,
        "hard_gate_overhead": medians["hard_gates"] / medians["train_gates"] - 1,
        "load_average": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"hard_gate_signal_cost_{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
