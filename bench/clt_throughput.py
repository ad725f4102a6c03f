"""CLT training throughput: sparse decode vs the dense-decode reference, on the same batch, in one run.

    python bench/clt_throughput.py                      # SmolLM2 sizes: 30 layers, d_model 576, F=4096
    python bench/clt_throughput.py --features 8192 --l0 16 32 --tokens 512

Times one training step's loss forward + backward (the part that differs between the two decoders)
and, with --optimizer, the AdamW step too (the same for both, per step not per token). Thresholds
are set per layer so the batch has the requested L0. Sparse and dense runs alternate and the
fastest repeat counts, since other jobs may share the CPU; the load average is recorded beside.
Writes bench/results/clt_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from runtime.files import write_json_atomic  # noqa: E402
from transcoders.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from transcoders.memory import reuse_freed_memory  # noqa: E402
from transcoders.train import clt_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "clt_throughput.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--features", type=int, default=4096, help="features per layer")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per batch")
    parser.add_argument("--l0", type=int, nargs="+", default=[32, 16], help="active features per token per layer")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", action="store_true", help="include the AdamW step (2 more copies of the CLT)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


@torch.no_grad()
def set_l0(clt: CrossLayerTranscoder, mlp_in: torch.Tensor, l0: int) -> None:
    """One threshold per layer: the pre-activation quantile that leaves `l0` features on per token."""
    pre = clt.pre_activations(mlp_in).transpose(0, 1).reshape(clt.n_layers, -1)  # [L, N * F]
    sample = pre[:, torch.randperm(pre.shape[1], generator=torch.Generator().manual_seed(0))[:1_000_000]]
    quantile = torch.quantile(sample, 1 - l0 / clt.n_features, dim=1)
    clt.threshold.copy_(quantile[:, None].expand_as(clt.threshold))


def time_step(clt, optimizer, mlp_in, mlp_out, decode: str) -> dict:
    """Wall and process-CPU seconds of one training step; the loss and the measured L0 for checking."""
    clt.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    terms = clt_loss(clt, mlp_in, mlp_out, sparsity_coefficient=1e-2, sparsity_c=4.0, preact_coefficient=3e-6,
                     decode=decode)
    terms.total.backward()
    if optimizer is not None:
        optimizer.step()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "loss": terms.total.item(), "l0": terms.l0_per_layer.mean().item()}


def measure(clt, optimizer, mlp_in, mlp_out, l0: int, repeats: int) -> dict:
    """Sparse and dense steps, alternating, after one warm-up each; the fastest repeat counts."""
    set_l0(clt, mlp_in, l0)
    runs: dict[str, list[dict]] = {"sparse": [], "dense": []}
    for repeat in range(repeats + 1):  # repeat 0 warms up: first touches of fresh memory are slow
        for decode in ("sparse", "dense"):
            run = time_step(clt, optimizer, mlp_in, mlp_out, decode)
            if repeat:
                runs[decode].append(run)
            print(f"L0 {l0} {decode}{'' if repeat else ' (warm-up)'}: {run['wall_s']:.1f} s wall, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    best = {decode: min(r["wall_s"] for r in runs[decode]) for decode in runs}
    tokens = len(mlp_in)
    return {
        "l0_target": l0,
        "l0_measured": runs["sparse"][0]["l0"],
        "sparse_tokens_per_s": tokens / best["sparse"],
        "dense_tokens_per_s": tokens / best["dense"],
        "ratio": best["dense"] / best["sparse"],
        "ratio_cpu_time": min(r["cpu_s"] for r in runs["dense"]) / min(r["cpu_s"] for r in runs["sparse"]),
        "loss_difference": abs(runs["sparse"][0]["loss"] - runs["dense"][0]["loss"]),
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = CLTConfig(n_layers=args.layers, d_model=args.d_model, n_features=args.features)
    clt = CrossLayerTranscoder(config, seed=0)
    generator = torch.Generator().manual_seed(0)
    mlp_in = torch.randn(args.tokens, args.layers, args.d_model, generator=generator)
    mlp_out = torch.randn(args.tokens, args.layers, args.d_model, generator=generator)
    optimizer = torch.optim.AdamW(clt.parameters(), lr=1e-9, fused=True) if args.optimizer else None
    load_at_start = os.getloadavg()
    with reuse_freed_memory():  # as in training: each step reuses the last step's pages
        rows = [measure(clt, optimizer, mlp_in, mlp_out, l0, args.repeats) for l0 in args.l0]
    result = {
        "benchmark": "CLT training step (loss forward + backward" + (" + AdamW" if args.optimizer else "") + ")",
        "shape": {"n_layers": args.layers, "d_model": args.d_model, "n_features": args.features,
                  "clt_parameters": config.n_parameters, "tokens_per_batch": args.tokens},
        "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                    "torch": torch.__version__},
        "results": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, result)
    print(f"\n{'L0':>4} {'sparse tok/s':>13} {'dense tok/s':>12} {'ratio':>6}  "
          f"(F={args.features}, {args.tokens} tokens, {args.threads} threads)")
    for row in rows:
        print(f"{row['l0_measured']:4.1f} {row['sparse_tokens_per_s']:13.1f} {row['dense_tokens_per_s']:12.1f} "
              f"{row['ratio']:6.2f}")
    print(f"written to {args.output}")
    return result


if __name__ == "__main__":
    main()
