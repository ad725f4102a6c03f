"""Step time of sparse post-training vs a plain fine-tuning step on the same batch and model.

Writes bench/results/sparsify_step.json.  The frozen reference forward that the constrained
objective needs is timed on its own, so the gated step is compared like for like.
Usage: python bench/sparsify_step.py [--model smollm2-135m] [--batch 4] [--context 128] [--repeats 5]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from sparse_attention.constraint import ControllerConfig, LagrangeController
from sparse_attention.data import DataConfig, load_token_blocks
from sparse_attention.evaluate import next_token_ce, next_token_kl
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import load_model
from sparse_attention.train import select_trainable

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def attention_params(model) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_("self_attn." in name)
        if p.requires_grad:
            params.append(p)
    return params


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model, tokenizer = load_model(args.model, attn_implementation="sdpa")
    tokens = load_token_blocks(DataConfig(max_train_tokens=50_000), tokenizer, args.context).train[: args.batch]
    reference = copy.deepcopy(model).eval()

    def plain_step(m, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            next_token_ce(m(input_ids=tokens).logits, tokens).backward()
            opt.step()
        return step

    results = {}
    for impl in ("sdpa", "eager"):
        plain = copy.deepcopy(model)
        plain.set_attn_implementation(impl)
        opt = torch.optim.AdamW(attention_params(plain), lr=1e-5)
        results[f"plain_{impl}_step_s"] = statistics.median(timed(plain_step(plain.train(), opt), args.repeats))
        del plain, opt

    gated = GatedModel(copy.deepcopy(model), offset_init=4.0).train().set_mode("train")
    weights = select_trainable(gated, "attention", learn_offset=True)
    opt = torch.optim.AdamW([{"params": [p for _, p in weights]}, {"params": [gated.offsets]}], lr=1e-5)
    controller = LagrangeController(ControllerConfig())
    with torch.no_grad():
        reference_logits = reference(input_ids=tokens).logits

    def gated_step():
        opt.zero_grad(set_to_none=True)
        out = gated(tokens)
        controller.loss(out.gate_record.regulariser(), next_token_kl(reference_logits, out.logits)).backward()
        opt.step()

    def reference_forward():
        with torch.no_grad():
            reference(input_ids=tokens)

    results["gated_step_s"] = statistics.median(timed(gated_step, args.repeats))
    results["reference_forward_s"] = statistics.median(timed(reference_forward, args.repeats))
    results["ratio_gated_vs_plain_sdpa"] = results["gated_step_s"] / results["plain_sdpa_step_s"]
    results["ratio_gated_vs_plain_eager"] = results["gated_step_s"] / results["plain_eager_step_s"]
    results["ratio_gated_plus_reference_vs_plain_sdpa"] = (
        (results["gated_step_s"] + results["reference_forward_s"]) / results["plain_sdpa_step_s"]
    )
    payload = {
        "benchmark": "sparsify_step",
        "model": args.model, "batch": args.batch, "context": args.context, "repeats": args.repeats,
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "load_average": os.getloadavg(), "target": "gated step <= 1.3x plain step",
        **results,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "sparsify_step.json"
    out.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
