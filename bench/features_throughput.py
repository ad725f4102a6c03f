"""Feature-dashboard pass throughput on SmolLM2-135M: the pass (harvest + encode + top-k/sample merge) vs
the harvest forward alone, on the same held-out blocks, in one run.

    python bench/features_throughput.py                          # random CLT of the SmolLM2 shape, F=512
    python bench/features_throughput.py --clt runs/demo/clt/dense --tokens 4064

The CLT: a trained one from --clt, else a random one (30 layers x 512 features, the demo preset's
shape) whose thresholds are set per layer so a batch has the requested L0 (a random CLT's own
thresholds fire about half the features, far denser than a trained one). Runs alternate and the
fastest repeat counts, since other jobs may share the CPU; the ratio of process CPU times is recorded
too (less sensitive to a busy machine), and the load average beside.
The one-off costs after the pass (weight evidence over the 49k-token vocabulary, labels, tables)
are timed once. Writes bench/results/features_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from runtime.files import write_json_atomic  # noqa: E402
from sparse_attention.data import DataConfig, iterate_blocks, load_token_blocks  # noqa: E402
from sparse_attention.models import SMOLLM2_NAME, load_model  # noqa: E402
from transcoders.clt import CLTConfig, CrossLayerTranscoder, load_clt, load_clt_metadata  # noqa: E402
from transcoders.config import FeaturesConfig  # noqa: E402
from transcoders.dashboards import dashboard_tables  # noqa: E402
from transcoders.feature_labels import weight_evidence  # noqa: E402
from transcoders.feature_scan import scan_activations  # noqa: E402
from transcoders.harvest import harvest_batch, model_shape  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "features_throughput.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clt", type=Path, default=None, help="a trained CLT directory (default: random)")
    parser.add_argument("--features", type=int, default=512, help="features per layer of the random CLT")
    parser.add_argument("--l0", type=int, default=32, help="active features per token per layer (random CLT)")
    parser.add_argument("--tokens", type=int, default=4064, help="held-out tokens per timed run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


@torch.no_grad()
def set_l0(clt: CrossLayerTranscoder, mlp_in: torch.Tensor, l0: int) -> None:
    """One threshold per layer: the pre-activation quantile that leaves `l0` features on per token."""
    pre = clt.pre_activations(mlp_in).transpose(0, 1).reshape(clt.n_layers, -1)  # [L, N * F]
    quantile = torch.quantile(pre[:, :1_000_000], 1 - l0 / clt.n_features, dim=1)
    clt.threshold.copy_(quantile[:, None].expand_as(clt.threshold))


def timed(work) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of work()."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def harvest_all(model, blocks: torch.Tensor, batch_size: int) -> None:
    for tokens in iterate_blocks(blocks, batch_size):
        harvest_batch(model, tokens)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(SMOLLM2_NAME)
    model.requires_grad_(False)
    data = DataConfig(context_length=128)
    heldout = load_token_blocks(data, tokenizer).heldout
    n_layers, d_model = model_shape(model)
    blocks = heldout[: -(-args.tokens // (heldout.shape[1] - 1))]
    tokens = len(blocks) * (blocks.shape[1] - 1)
    if args.clt is not None:
        clt = load_clt(args.clt)
        source = {"kind": "trained", "directory": str(args.clt.resolve()),
                  "train_steps": load_clt_metadata(args.clt).get("train_steps")}
    else:
        clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d_model, n_features=args.features), seed=0)
        set_l0(clt, harvest_batch(model, heldout[-4:])[0], args.l0)  # calibrated on blocks outside the timed ones
        source = {"kind": "random", "l0_target": args.l0}
    config = FeaturesConfig(tokens=tokens, batch_size=args.batch_size)
    load_at_start = os.getloadavg()
    runs: dict[str, list[dict]] = {"harvest": [], "pass": []}
    state = None
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # repeat 0 warms up
            wall, cpu, _ = timed(lambda: harvest_all(model, blocks, args.batch_size))
            runs["harvest"].append({"wall_s": wall, "cpu_s": cpu})
            wall, cpu, state = timed(lambda repeat=repeat: scan_activations(
                model, clt, blocks, config, state_path=Path(scratch) / f"state{repeat}.pt", progress=False))
            runs["pass"].append({"wall_s": wall, "cpu_s": cpu})
            print(f"repeat {repeat}{' (warm-up)' if not repeat else ''}: harvest {runs['harvest'][-1]['wall_s']:.1f} s,"
                  f" pass {wall:.1f} s, load {os.getloadavg()[0]:.1f}", flush=True)
    best = {name: min(run["wall_s"] for run in times[1:]) for name, times in runs.items()}
    best_cpu = {name: min(run["cpu_s"] for run in times[1:]) for name, times in runs.items()}
    started = time.perf_counter()
    evidence = weight_evidence(model, clt, config.n_tokens_listed, len(tokenizer))
    evidence_seconds = time.perf_counter() - started
    started = time.perf_counter()
    features, examples = dashboard_tables(state, evidence, blocks, tokenizer, config)
    tables_seconds = time.perf_counter() - started
    result = {
        "benchmark": "feature-dashboard pass (harvest + encode + top-k/sample merge) vs harvest forward alone",
        "model": SMOLLM2_NAME,
        "clt": {"n_layers": clt.n_layers, "d_model": clt.d_model, "n_features": clt.n_features, **source},
        "l0_measured": float(state.count.sum() / state.tokens_done / clt.n_layers),
        "tokens_per_run": tokens,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "harvest_tokens_per_s": tokens / best["harvest"],
        "pass_tokens_per_s": tokens / best["pass"],
        "ratio": best["harvest"] / best["pass"],
        "ratio_cpu_time": best_cpu["harvest"] / best_cpu["pass"],
        "one_off_seconds": {"weight_evidence": evidence_seconds, "labels_and_tables": tables_seconds,
                            "feature_rows": features.num_rows, "example_rows": examples.num_rows},
        "runs_seconds": runs,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg(),
                    "torch": torch.__version__},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output, result)
    print(f"pass {result['pass_tokens_per_s']:.0f} tok/s, harvest alone {result['harvest_tokens_per_s']:.0f} tok/s, "
          f"ratio {result['ratio']:.2f} (CPU time {result['ratio_cpu_time']:.2f}; target >= 0.8); evidence {evidence_seconds:.0f} s, tables "
          f"{tables_seconds:.0f} s; written to {args.output}")
    return result


if __name__ == "__main__":
    main()
