"""Is bench/precision.py's held-out CE difference after 4 sparsify steps (bf16 - fp32 = +0.013, seed 0) a
systematic bf16 effect or the noise of 4 steps? Runs that need no bf16 hardware, on SmolLM2-135M with the
bench's settings (4 steps of 4 x 128 tokens, lr 1e-4, offset 4, held-out CE of 8 blocks evaluated in fp32):

- `fp32:SEED`: the fp32 run (SEED picks the batches and the gate noise);
- `emulated:SEED`: bf16 matmul numerics emulated at fp32 speed: every linear/matmul rounds its inputs and its
  output to bfloat16, and the gradients flowing back through them (bf16 matmuls with fp32 accumulation);
  the gate noise is fp32;
- `fp32_bf16noise:SEED`: the fp32 run with the training-gate noise drawn as bf16 autocast drew it before
  sparse_attention/gate.py's fix (u and the logs in bfloat16);
- `fp32_othernoise:SEED`: the control: the fp32 run on the same batches with other gate-noise draws (the noise
  generator seeded with SEED + 1000).

Each run prints one JSON row; all rows go to bench/results/<--out>.
Usage: nice -n 5 python bench/precision_ce_noise.py --runs fp32:0,emulated:0,fp32_bf16noise:0 [--out NAME.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

import sparse_attention.gated_attention as gated_attention  # noqa: E402
from sparse_attention.config import TrainConfig  # noqa: E402
from sparse_attention.constraint import ControllerConfig  # noqa: E402
from sparse_attention.data import DataConfig, load_token_blocks  # noqa: E402
from sparse_attention.evaluate import mean_ce  # noqa: E402
from sparse_attention.gated_attention import GatedModel  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402
from sparse_attention.train import post_train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fp32", "emulated", "fp32_bf16noise", "fp32_othernoise")
MATMULS = {F.linear, torch._C._nn.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
           torch.mm}


class RoundToBF16(torch.autograd.Function):
    """x rounded to bfloat16 (kept in x's dtype); the gradient rounded the same way on the way back."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.bfloat16).to(grad.dtype)


def _rounded(x):
    return RoundToBF16.apply(x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class EmulatedBF16Matmuls(TorchFunctionMode):
    """Inside the block every linear/matmul sees bf16-rounded inputs and returns a bf16-rounded output."""

    calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMULS:
            EmulatedBF16Matmuls.calls += 1
            args = tuple(_rounded(a) for a in args)
            kwargs = {k: _rounded(v) for k, v in kwargs.items()}
            return _rounded(func(*args, **kwargs))
        return func(*args, **kwargs)


def bf16_drawn_noise(shape, *, like, generator=None):
    """The training-gate noise as bf16 autocast drew it before the fix: u and the logs in bfloat16."""
    u = torch.rand(shape, dtype=torch.bfloat16, device=like.device, generator=generator).clamp(1e-6, 1 - 1e-6)
    return (torch.log(u) - torch.log1p(-u)).to(like.dtype)


def one_run(model, data, heldout, mode: str, seed: int) -> dict:
    fixed_noise = gated_attention.logistic_noise
    gated_attention.logistic_noise = bf16_drawn_noise if mode == "fp32_bf16noise" else fixed_noise
    try:
        cpu_started = time.process_time()
        torch.manual_seed(0)
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        gated = GatedModel(copy.deepcopy(model), offset_init=4.0)
        if mode == "fp32_othernoise":  # post_train hands set_mode its noise generator, seeded with `seed`
            set_mode = gated.set_mode
            gated.set_mode = lambda gate_mode, *, noise=True, generator=None: set_mode(
                gate_mode, noise=noise, generator=None if generator is None else generator.manual_seed(seed + 1000))
        train = TrainConfig(steps=4, batch_size=4, warmup_steps=1, lr=1e-4, checkpoint_every=10_000,
                            precision="fp32", seed=seed)
        calls_before = EmulatedBF16Matmuls.calls
        with EmulatedBF16Matmuls() if mode == "emulated" else contextlib.nullcontext():
            result = post_train(gated, reference, data.train, train, ControllerConfig(), learn_offset=True,
                                progress=False)
        heldout_ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, heldout, 4)
    finally:
        gated_attention.logistic_noise = fixed_noise
    history = result.history
    return {"mode": mode, "seed": seed, "heldout_ce": heldout_ce, "train_ce": [h["ce"] for h in history],
            "hard_ce": [h.get("hard_ce") for h in history], "open_fraction": [h["open_fraction"] for h in history],
            "mean_offset": [h["mean_offset"] for h in history], "cpu_seconds": time.process_time() - cpu_started,
            "matmul_calls_rounded": EmulatedBF16Matmuls.calls - calls_before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, help="comma-separated MODE:SEED, MODE one of " + ", ".join(MODES))
    parser.add_argument("--out", default="precision_ce_noise_smollm2.json")
    args = parser.parse_args()
    runs = []
    for item in args.runs.split(","):
        mode, _, seed = item.partition(":")
        if mode not in MODES or not seed.isdigit():
            raise SystemExit(f"--runs: {item!r} is not MODE:SEED with MODE one of {', '.join(MODES)}")
        runs.append((mode, int(seed)))
    torch.set_num_threads(1)
    model, tokenizer = load_model("smollm2-135m")
    model.requires_grad_(False)
    data = load_token_blocks(DataConfig(max_train_tokens=100_000, max_heldout_tokens=20_000), tokenizer, 128)
    heldout = data.heldout[:8]
    uptime = lambda: subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()  # noqa: E731
    payload = {"benchmark": "precision_ce_noise", "command": "nice -n 5 python " + " ".join(sys.argv),
               "torch": torch.__version__, "uptime_before": uptime(), "rows": []}
    for mode, seed in runs:
        row = one_run(model, data, heldout, mode, seed)
        print(json.dumps(row), flush=True)
        payload["rows"].append(row)
        payload["uptime_after"] = uptime()
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / args.out).write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
