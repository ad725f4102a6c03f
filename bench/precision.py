"""bf16 against fp32, side by side in one run on SmolLM2-135M: every stage with a `precision` setting.

Per precision: sparsify training step time (post_train, `--steps` steps of `--batch` x `--context` tokens)
and the held-out CE of the trained model (evaluated in fp32); CLT harvest + training tokens/s (train_clt
fed by harvest_stream) and the trained CLT's held-out nMSE (fp32 evaluation, equal tokens); feature scan
tokens/s; component-circuit patched forward passes/s with the patched metric's largest bf16 - fp32
difference. Each timing is kept as wall seconds and as process CPU seconds (`time.process_time()`, all
threads of this process), and each speedup as both ratios: under load from other processes the CPU-second
ratio is the steadier one. Then a torch.profiler table (top ops by self CPU time) of one bf16 sparsify step,
one bf16 CLT step, a bf16 scan batch and 4 bf16 patched passes. Writes bench/results/<--out> (default
precision_smollm2.json) with the command and the load (`uptime`). Refuses to start, with PrecisionError,
where the CPU has no bfloat16 units (bf16 would be emulated, ~40x slower than fp32 on an AVX2 CPU).
Usage: nice -n 5 python bench/precision.py [--steps 4] [--clt-steps 6] [--threads 1] [--out NAME.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from circuits.hooks import patched_metric, prepare, record  # noqa: E402
from prompts.batches import encode_prompts  # noqa: E402
from prompts.tasks import load_task  # noqa: E402
from runtime.precision import autocast, bf16_supported, frozen_copy  # noqa: E402
from sparse_attention.config import TrainConfig  # noqa: E402
from sparse_attention.constraint import ControllerConfig  # noqa: E402
from sparse_attention.data import DataConfig, load_token_blocks  # noqa: E402
from sparse_attention.evaluate import mean_ce  # noqa: E402
from sparse_attention.gated_attention import GatedModel  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402
from sparse_attention.train import post_train  # noqa: E402
from transcoders.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from transcoders.config import CLTTrainConfig, FeaturesConfig  # noqa: E402
from transcoders.evaluate import reconstruction_metrics  # noqa: E402
from transcoders.feature_scan import scan_activations  # noqa: E402
from transcoders.harvest import ShuffleBuffer, harvest_stream, model_shape  # noqa: E402
from transcoders.train import train_clt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PRECISIONS = ("fp32", "bf16")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def top_ops(prof, n: int = 10) -> list[dict]:
    """The profile's top `n` ops by self CPU time."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
             "self_cpu_share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events]


class _ProfileLastStep:
    """on_step callback: the profiler records exactly the last of `steps` steps."""

    def __init__(self, steps: int):
        self.steps, self.profiler = steps, profile(activities=[ProfilerActivity.CPU])

    def __call__(self, row: dict) -> None:
        if row["step"] == self.steps - 1:
            self.profiler.start()
        elif row["step"] == self.steps:
            self.profiler.stop()


def profile_sparsify_step(model, blocks, train: TrainConfig) -> list[dict]:
    """Top ops of the second of two sparsify steps (the first warms up), on a fresh gated copy."""
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    gated = GatedModel(copy.deepcopy(model), offset_init=4.0)
    callback = _ProfileLastStep(2)
    post_train(gated, reference, blocks, train.model_copy(update={"steps": 2, "warmup_steps": 1}),
               ControllerConfig(), learn_offset=True, progress=False, on_step=callback)
    return top_ops(callback.profiler)


def profile_clt_step(clt_config: CLTConfig, open_source, config: CLTTrainConfig, precision: str) -> list[dict]:
    """Top ops of one CLT training step of a fresh CLT (the second of two, on one harvested batch: harvesting
    not included)."""
    batch = next(iter(open_source(None)))

    class OneBatch:
        def __iter__(self):
            while True:
                yield batch

        def state(self) -> dict:
            return {}

    callback = _ProfileLastStep(2)
    train_clt(CrossLayerTranscoder(clt_config, seed=1), lambda state: OneBatch(),
              config.model_copy(update={"steps": 2}), precision=precision, progress=False, on_step=callback)
    return top_ops(callback.profiler)


def sparsify_run(model, blocks, heldout, args, precision: str, profile_step: bool = False) -> dict:
    """Train a gated copy of `model` for args.steps steps in `precision`; step times and fp32 held-out CE."""
    torch.manual_seed(0)
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    gated = GatedModel(copy.deepcopy(model), offset_init=4.0)
    train = TrainConfig(steps=args.steps, batch_size=args.batch, warmup_steps=1, lr=1e-4,
                        checkpoint_every=10_000, precision=precision)
    stamps = [(time.perf_counter(), time.process_time())]
    result = post_train(gated, reference, blocks, train, ControllerConfig(), learn_offset=True, progress=False,
                        on_step=lambda row: stamps.append((time.perf_counter(), time.process_time())))
    step_seconds = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][1:]  # the first step warms up
    step_cpu_seconds = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][1:]
    heldout_ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, heldout, 4)
    out = {"step_seconds_median": statistics.median(step_seconds), "step_seconds": step_seconds,
           "step_cpu_seconds_median": statistics.median(step_cpu_seconds), "step_cpu_seconds": step_cpu_seconds,
           "heldout_ce_fp32_eval": heldout_ce, "final_open_fraction": result.history[-1]["open_fraction"],
           "final_train_ce": result.history[-1]["ce"]}
    if profile_step:
        out["profile_top_ops"] = profile_sparsify_step(model, blocks, train)
    return out


def clt_run(lm, blocks, heldout, args, precision: str, profile_step: bool = False
            ) -> tuple[dict, CrossLayerTranscoder]:
    """Harvest + train a CLT for args.clt_steps steps in `precision`; tokens/s and its fp32 held-out nMSE."""
    n_layers, d_model = model_shape(lm)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=n_layers, d_model=d_model, n_features=args.features), seed=0)
    config = CLTTrainConfig(steps=args.clt_steps, batch_tokens=args.clt_batch_tokens, warmup_steps=1,
                            checkpoint_every=10_000, normalisation_batches=2, lr=2e-4)

    harvest_lm = frozen_copy(lm, precision)  # as the CLT stage harvests: bf16 Linear weights under bf16

    def open_source(state):
        return ShuffleBuffer(lambda start: harvest_stream(harvest_lm, blocks, 4, 0, start_batch=start,
                                                          precision=precision),
                             4 * args.clt_batch_tokens, args.clt_batch_tokens, state=state)

    started, cpu_started = time.perf_counter(), time.process_time()
    result = train_clt(clt, open_source, config, precision=precision, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    recon = reconstruction_metrics(lm, clt, heldout, 4)
    out = {"tokens": result.tokens_seen, "seconds_harvest_and_train": seconds,
           "tokens_per_second": result.tokens_seen / seconds, "cpu_seconds_harvest_and_train": cpu_seconds,
           "tokens_per_cpu_second": result.tokens_seen / cpu_seconds, "heldout_nmse_fp32_eval": recon["nmse"],
           "final_train_nmse": result.history[-1]["nmse"], "final_train_l0": result.history[-1]["l0"]}
    if profile_step:
        out["profile_top_ops"] = profile_clt_step(clt.config, open_source, config, precision)
    return out, clt


def features_run(lm, clt, heldout, args, precision: str, profile_step: bool = False) -> dict:
    config = FeaturesConfig(tokens=args.feature_tokens, top_k=5, n_random=2, batch_size=4, precision=precision)
    started, cpu_started = time.perf_counter(), time.process_time()
    state = scan_activations(lm, clt, heldout, config, progress=False)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    out = {"tokens": state.tokens_done, "seconds": seconds, "tokens_per_second": state.tokens_done / seconds,
           "cpu_seconds": cpu_seconds, "tokens_per_cpu_second": state.tokens_done / cpu_seconds,
           "n_active": int(state.count.sum())}
    if profile_step:  # one scan batch (4 blocks), the copy of the LM included as in every scan
        one_batch = config.model_copy(update={"tokens": 4 * (heldout.shape[1] - 1)})
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            scan_activations(lm, clt, heldout, one_batch, progress=False)
        out["profile_top_ops"] = top_ops(prof)
    return out


def circuits_run(model, tokenizer, args) -> dict:
    """Patched forward passes (random head subsets kept) on IOI prompts, in each precision on the same masks."""
    batch = encode_prompts(load_task("ioi")[: args.circuit_prompts], tokenizer, args.circuit_prompts)[0]
    layout = prepare(model.eval()).layout
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(layout.n_layers, layout.n_heads, generator=generator) < 0.5 for _ in range(args.patches)]
    out, metrics = {}, {}
    for precision in PRECISIONS:
        prepared = prepare(model.eval(), split_qkv=True, precision=precision)
        with autocast(precision):
            recording, _ = record(prepared, batch.corrupted)
            patched_metric(prepared, batch, recording, keep_heads=masks[0])  # warm-up
            started, cpu_started = time.perf_counter(), time.process_time()
            metrics[precision] = torch.stack([patched_metric(prepared, batch, recording, keep_heads=m)
                                              for m in masks])  # [patches, prompts]
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        out[precision] = {"forward_passes": len(masks), "prompts_per_pass": int(batch.clean.shape[0]),
                          "tokens_per_prompt": int(batch.clean.shape[1]), "seconds": seconds,
                          "forward_passes_per_second": len(masks) / seconds, "cpu_seconds": cpu_seconds,
                          "forward_passes_per_cpu_second": len(masks) / cpu_seconds}
        if precision == "bf16":  # the top ops of 4 patched passes
            with autocast(precision), profile(activities=[ProfilerActivity.CPU]) as prof:
                for m in masks[:4]:
                    patched_metric(prepared, batch, recording, keep_heads=m)
            out["bf16_profile_top_ops"] = top_ops(prof)
    out["metric_max_abs_difference"] = float((metrics["bf16"] - metrics["fp32"]).abs().max())
    out["metric_mean_abs_fp32"] = float(metrics["fp32"].abs().mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4, help="sparsify steps per precision")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--heldout-blocks", type=int, default=8)
    parser.add_argument("--features", type=int, default=512, help="CLT features per layer")
    parser.add_argument("--clt-steps", type=int, default=6)
    parser.add_argument("--clt-batch-tokens", type=int, default=512)
    parser.add_argument("--feature-tokens", type=int, default=1016)
    parser.add_argument("--circuit-prompts", type=int, default=8)
    parser.add_argument("--patches", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="precision_smollm2.json",
                        help="file in bench/results/ (name a noisy run by its load, e.g. precision_smollm2_under_load6.json)")
    args = parser.parse_args()
    if not bf16_supported("cpu"):  # before loading anything: emulated bf16 measures nothing worth keeping
        raise SystemExit("bench/precision.py compares bf16 with fp32 and needs a CPU with bfloat16 units (AVX512-BF16 "
                         f"or AMX); this one has none (torch cpu capability {torch.backends.cpu.get_cpu_capability()})")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    model, tokenizer = load_model(args.model)
    model.requires_grad_(False)
    data = load_token_blocks(DataConfig(max_train_tokens=100_000, max_heldout_tokens=20_000), tokenizer,
                             args.context)
    heldout = data.heldout[: args.heldout_blocks]
    payload = {
        "benchmark": "precision", "command": "nice -n 5 python " + " ".join(sys.argv), "complete": False,
        "model": args.model, "args": vars(args), "torch": torch.__version__, "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cuda": "unrun (no GPU on this machine)",
        "uptime_before": uptime(), "uptime_after_each": {}, "summary": {},
        "circuits": {}, "sparsify": {}, "clt": {}, "features": {},
    }
    out = RESULTS / args.out
    RESULTS.mkdir(exist_ok=True)

    def record(section: str, precision: str | None, result: dict, ratio: tuple[str, str, str, bool] | None = None):
        """Store a result, the load after it, and (once both precisions are in) a ratio; rewrite the JSON."""
        if precision is None:
            payload[section] = result
        else:
            payload[section][precision] = result
        payload["uptime_after_each"][f"{section} {precision or ''}".strip()] = uptime()
        if ratio is not None and all(p in payload[section] for p in PRECISIONS):
            name, key, how, bf16_over_fp32 = ratio
            a, b = payload[section]["bf16"][key], payload[section]["fp32"][key]
            payload["summary"][name] = (a - b if how == "difference" else a / b if bf16_over_fp32 else b / a)
        payload["wall_seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(payload, indent=2))
        print(section, precision or "", json.dumps(payload["summary"]), flush=True)

    record("circuits", None, circuits_run(model, tokenizer, args))
    circuits = payload["circuits"]
    for key in ("forward_passes_per_second", "forward_passes_per_cpu_second"):
        payload["summary"][f"circuits_{key}_speedup"] = circuits["bf16"][key] / circuits["fp32"][key]
    for precision in PRECISIONS:
        result = sparsify_run(model, data.train, heldout, args, precision, profile_step=precision == "bf16")
        record("sparsify", precision, result, ("sparsify_step_speedup", "step_seconds_median", "ratio", False))
        record("sparsify", precision, result, ("sparsify_step_cpu_speedup", "step_cpu_seconds_median", "ratio", False))
        record("sparsify", precision, result, ("sparsify_heldout_ce_bf16_minus_fp32", "heldout_ce_fp32_eval",
                                               "difference", True))
    for precision in PRECISIONS:
        result, clt = clt_run(model, data.train, heldout, args, precision, profile_step=precision == "bf16")
        record("clt", precision, result, ("clt_tokens_per_second_speedup", "tokens_per_second", "ratio", True))
        record("clt", precision, result, ("clt_tokens_per_cpu_second_speedup", "tokens_per_cpu_second", "ratio", True))
        record("clt", precision, result, ("clt_heldout_nmse_bf16_minus_fp32", "heldout_nmse_fp32_eval",
                                          "difference", True))
        if precision == "fp32":
            del clt  # a SmolLM2 CLT is ~0.6 GB; the bf16 one is scanned below
    for precision in PRECISIONS:  # the same (bf16-trained) CLT, scanned in each precision
        result = features_run(model, clt, data.heldout, args, precision, profile_step=precision == "bf16")
        record("features", precision, result, ("features_tokens_per_second_speedup", "tokens_per_second", "ratio", True))
        record("features", precision, result, ("features_tokens_per_cpu_second_speedup", "tokens_per_cpu_second",
                                               "ratio", True))
    payload["summary"]["goal"] = "each speedup >= 2, held-out CE within 0.01 nats, CLT nMSE within 0.01 at equal tokens"
    payload["complete"] = True
    record("uptime_after", None, uptime())
    print(json.dumps({"summary": payload["summary"], "wall_seconds": payload["wall_seconds"]}, indent=2))

if __name__ == "__main__":
    main()
