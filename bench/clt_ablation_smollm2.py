"""CLT levers on SmolLM2-135M (dense), each on and off at one equal CPU budget: the demo preset's CLT (512
features) against one change each (skip path, harvest reuse 1 / 4, no firing-fraction init, encoder from the
decoders' transpose). Held-out nMSE, L0, CE recovered, dead fraction, tokens seen and training CPU seconds.

    python bench/clt_ablation_smollm2.py calibrate                       # CPU cost of harvesting and of a step
    python bench/clt_ablation_smollm2.py run --variant baseline --cpu-budget 240
    python bench/clt_ablation_smollm2.py collect --tag amd               # bench/results/clt_ablation_smollm2_amd.json

The budget is process CPU seconds of training, harvest included (one torch thread, so CPU time is what the
shared machine gave this process, whatever the load). `calibrate` measures, in one process, the CPU seconds
per harvested token (an LM forward) and per training step of each variant at its initial L0; `run` turns the
budget into steps: (budget - buffer fill) / (step + batch_tokens / reuse harvested tokens), then runs the CLT
stage (transcoders.stage.run) with those steps and records the CPU seconds it actually took.
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
MACHINE = "AMD EPYC 2-core AVX2, fp32"

# overrides of the demo preset's clt section (pipeline/presets/demo.yaml), one lever each
VARIANTS = {
    "baseline": [],
    "skip": ["clt.clt.skip=true"],  # W_skip from zero
    "reuse1": ["clt.harvest.reuse=1"],
    "reuse4": ["clt.harvest.reuse=4"],
    "no_firing_init": ["clt.train.init_firing_fraction=null"],
    "encoder_transpose": ["clt.train.encoder_init=decoder_transpose"],
    "skip_reuse4": ["clt.clt.skip=true", "clt.harvest.reuse=4"],
    "skip_seed1": ["clt.clt.skip=true", "clt.harvest.seed=1"],  # another shuffle order: run-to-run noise
}
BASE = ["clt.clt.skip=false"]  # the demo preset's CLT as the table measured it (the preset now turns skip on)
CALIBRATION_STEPS = 6  # timed steps per variant, after one untimed


def demo_config(overrides: list[str]):
    from pipeline.config import load_config

    return load_config(preset="demo", overrides=[*BASE, *overrides, "clt.train.threads=1"])


def cpu_seconds(fn) -> tuple[object, float]:
    started = time.process_time()
    out = fn()
    return out, time.process_time() - started


def calibrate(args: argparse.Namespace) -> None:
    """CPU seconds per harvested token and per training step (harvest excluded) of every variant."""
    import torch

    from sparse_attention.data import load_token_blocks
    from sparse_attention.sources import load_source
    from transcoders.clt import CLTConfig, CrossLayerTranscoder
    from transcoders.harvest import harvest_stream, model_shape
    from transcoders.train import _Counters, _train_step, initialise_from_data

    torch.set_num_threads(1)
    base = demo_config([])
    lm, tokenizer, _ = load_source(base.sparsify.model)
    blocks = load_token_blocks(base.clt.data, tokenizer)
    n_layers, d_model = model_shape(lm)
    stream = harvest_stream(lm, blocks.train, base.clt.harvest.batch_size, 0)
    next(stream)  # warm-up
    chunks, harvest_cpu = cpu_seconds(lambda: [next(stream) for _ in range(4)])
    mlp_in, mlp_out = torch.cat([x for x, _ in chunks]), torch.cat([y for _, y in chunks])  # [N, L, D]
    per_token = harvest_cpu / len(mlp_in)
    result = {"harvest_cpu_per_token": per_token, "load_average_before": os.getloadavg(), "steps": {}}
    for variant, overrides in VARIANTS.items():
        config = demo_config(overrides).clt
        clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d_model, n_features=config.clt.n_features,
                                             threshold_init=config.clt.threshold_init, skip=config.clt.skip))
        n = config.train.batch_tokens
        batches = [(mlp_in[i * n:(i + 1) * n], mlp_out[i * n:(i + 1) * n]) for i in range(len(mlp_in) // n)]
        initialise_from_data(clt, batches[:config.train.normalisation_batches], config.train.init_firing_fraction,
                             config.train.skip_init, config.train.encoder_init)
        optimizer = torch.optim.AdamW(clt.parameters(), lr=config.train.lr, fused=True)
        counters = _Counters(0, torch.zeros(n_layers, config.clt.n_features, dtype=torch.int64))

        def step(k: int, clt=clt, optimizer=optimizer, config=config, counters=counters, batches=batches):
            return _train_step(clt, optimizer, *batches[k % len(batches)], config.train, k, counters, "fp32")

        step(0)
        rows, spent = cpu_seconds(lambda step=step: [step(k) for k in range(1, 1 + CALIBRATION_STEPS)])
        result["steps"][variant] = {"cpu_per_step": spent / CALIBRATION_STEPS, "l0": rows[-1]["l0"]}
        print(variant, result["steps"][variant], flush=True)
        del clt, optimizer
    result["load_average_after"] = os.getloadavg()
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "calibration.json").write_text(json.dumps(result, indent=1))
    print(f"harvest: {per_token * 1e3:.2f} ms CPU per token")


def step_kind(variant: str) -> tuple:
    """What sets a training step's cost: the skip path and the initial L0 (firing-fraction init or not)."""
    config = demo_config(VARIANTS[variant]).clt
    return config.clt.skip, config.train.init_firing_fraction


def steps_for_budget(variant: str, budget: float, calibration: dict) -> int:
    """Steps whose training (with the harvest it needs) costs `budget` CPU seconds by the calibration. A step's
    cost is the mean over the calibrated variants of the same step kind: their measured costs differ by the
    load's noise (up to ~15% between identical steps at load 6-8), not by the harvest settings."""
    config = demo_config(VARIANTS[variant]).clt
    same = [v for v in calibration["steps"] if step_kind(v) == step_kind(variant)]
    step = sum(calibration["steps"][v]["cpu_per_step"] for v in same) / len(same)
    per_token = calibration["harvest_cpu_per_token"]
    per_step = step + per_token * config.train.batch_tokens / config.harvest.reuse
    return int((budget - per_token * config.harvest.buffer_tokens) / per_step)


def run(args: argparse.Namespace) -> None:
    import torch

    from transcoders import stage

    torch.set_num_threads(1)
    calibration = json.loads((args.output / "calibration.json").read_text())
    steps = args.steps or steps_for_budget(args.variant, args.cpu_budget, calibration)
    config = demo_config([*VARIANTS[args.variant], f"clt.train.steps={steps}", f"clt.train.checkpoint_every={steps}"])
    load_before, started = os.getloadavg(), time.perf_counter()
    output = args.output / args.variant
    metrics = stage.run(config.clt, config.sparsify.model, output, progress=False)
    history = metrics.pop("history")
    every = max(1, len(history) // 20)
    record = {
        "command": f"nice -n 5 python bench/clt_ablation_smollm2.py run --variant {args.variant} "
                   + (f"--steps {args.steps}" if args.steps else f"--cpu-budget {args.cpu_budget:g}"),
        "overrides": VARIANTS[args.variant], "steps": steps, "cpu_budget": args.cpu_budget,
        "stage_wall_seconds": time.perf_counter() - started, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "metrics": metrics,
        "history": [{key: row[key] for key in ("step", "tokens", "nmse", "l0", "dead_fraction", "lambda_s",
                                                "seconds")}
                    for row in history[::every] + history[-1:]],
    }
    (output / "bench_record.json").write_text(json.dumps(record, indent=1))
    print(args.variant, {key: metrics[key] for key in ("nmse", "l0", "ce_recovered_fraction", "dead_fraction",
                                                       "train_tokens_seen", "train_cpu_seconds")})


SUMMARY_KEYS = ("nmse", "l0", "ce_recovered_fraction", "dead_fraction", "train_dead_fraction", "train_tokens_seen",
                "train_steps", "train_cpu_seconds", "train_wall_seconds", "clt_parameters", "peak_rss_gb")


def collect(args: argparse.Namespace) -> None:
    calibration = json.loads((args.output / "calibration.json").read_text())
    result = {"what": __doc__.splitlines()[0], "machine": MACHINE, "cpu_count": os.cpu_count(),
              "platform": platform.machine(), "precision": "fp32", "threads": 1,
              "commands": ["nice -n 5 python bench/clt_ablation_smollm2.py calibrate",
                           "nice -n 5 python bench/clt_ablation_smollm2.py run --variant V --cpu-budget B (per variant)",
                           f"python bench/clt_ablation_smollm2.py collect --tag {args.tag}"],
              "calibration": calibration, "table": {}, "variants": {}}
    for variant in VARIANTS:
        path = args.output / variant / "bench_record.json"
        if path.exists():
            record = json.loads(path.read_text())
            result["table"][variant] = {key: record["metrics"].get(key) for key in SUMMARY_KEYS}
            result["variants"][variant] = record
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"clt_ablation_smollm2_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"{'variant':20s} {'nMSE':>6s} {'L0':>6s} {'CE rec':>7s} {'dead':>6s} {'tokens':>7s} {'steps':>5s} {'CPU s':>6s}")
    for variant, m in result["table"].items():
        print(f"{variant:20s} {m['nmse']:6.3f} {m['l0']:6.1f} {m['ce_recovered_fraction']:7.3f} {m['dead_fraction']:6.3f} "
              f"{m['train_tokens_seen']:7d} {m['train_steps']:5d} {m['train_cpu_seconds']:6.0f}")
    print(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["calibrate", "run", "collect"])
    parser.add_argument("--variant", choices=list(VARIANTS), default="baseline")
    parser.add_argument("--cpu-budget", type=float, default=240.0, help="CPU seconds of training, harvest included")
    parser.add_argument("--steps", type=int, default=None, help="run this many steps instead of the budget's")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-clt-ablation")
    parser.add_argument("--tag", default="amd")
    args = parser.parse_args(argv)
    {"calibrate": calibrate, "run": run, "collect": collect}[args.action](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
