"""The sparsify stage on SmolLM2 once per gate.offset_scope, same recipe otherwise: open edges and keys per
query, held-out CE and KL against the original on each evaluated corpus and length, heads over 20% open,
task behaviour, wall time. Runs the stage directly (no Ray), one thread.

    python bench/sparsify_offset_scope.py --scopes model head --set train.steps=100 --set data.context_length=512

`--set` overrides fields of the demo preset's sparsify config (dotted paths below `sparsify.`). Writes
bench/results/sparsify_offset_scope_<tag>.json with the command; each run's stage output stays in --output.

    python bench/sparsify_offset_scope.py --record runs/faithful/sparsify runs/bench-offset-scope/model --tag x

summarises finished sparsify stage outputs instead (e.g. a pipeline run beside a run of this script), same figures.

    python bench/sparsify_offset_scope.py --scopes model --set train.steps=96 ... --truncate runs/x/model --tag y

evaluates an unfinished run at its last checkpoint (step N of a longer schedule; the learning rate followed the
longer schedule's cosine up to N): the same --set arguments as the run, whose config must match the one saved in the
run's directory in everything but eval; the checkpoint is copied into --output under the fingerprint of the config
with train.steps=N, and the stage there trains no step, then saves and evaluates. The JSON records the run and its
planned steps under "truncated_from".

    python bench/sparsify_offset_scope.py --scopes model ... --set controller.lambda_min=0.1 \
        --branch runs/x/model --branch-checkpoint saved/train_state.pt --tag z

continues a run from one of its checkpoints (a copy kept at the step wanted; default its last) under a changed
controller, constraint, head cap, closed heads or long-step lengths: the --set arguments may differ from the run's
saved config only in `controller`, `eval`, train.steps, train.constraint, train.head_cap(_weight, _through),
gate.closed_heads and data.long_context_length / data.long_every, so the learning-rate schedule and gate noise go
on as the run's own, and so do the batches unless the long steps changed (then every stream resumes where the new
schedule's first steps would have left it). The JSON records the run and the step under "branched_from".

    python bench/sparsify_offset_scope.py --stopped runs/x/model --tag y

records a run stopped before its end without evaluating it: its checkpoint's history (every step), the last steps'
means and the per-stream breakdown.

    python bench/sparsify_offset_scope.py --paired runs/x/model runs/y/model --steps 217 272 --tag xy

compares runs that saw the same batches (a run and its branches) over the same steps, from their checkpoints'
histories: mean open fraction of the training gates at each length, mean deterministic-gate CE excess per stream,
and the multipliers at the last step. Writes bench/results/sparsify_paired_<tag>.json.
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from prompts.metrics import task_evaluator  # noqa: E402
from prompts.training import task_distillation  # noqa: E402
from sparse_attention import stage  # noqa: E402
from sparse_attention.config import SparsifyConfig  # noqa: E402
from sparse_attention.data import draw_schedule, stream_name  # noqa: E402
from sparse_attention.train import CHECKPOINT_NAME  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def step_streams(config: SparsifyConfig, steps: int) -> list[str]:
    """The streams of the batches of steps 1..`steps` (joined with ' + ' when a step draws several)."""
    draws = config.train.grad_accumulation
    schedule = draw_schedule(config.data, draws)
    return [" + ".join(stream_name(next(schedule)) for _ in range(draws)) for _ in range(steps)]


def by_stream(history: list[dict], config: SparsifyConfig) -> list[dict]:
    """Mean CE excess over the original (deterministic and noisy gates) and lambda per (source, length) of the
    step's batches, over the second half of training: which corpus and length the constraint binds on."""
    groups: dict[str, list[dict]] = {}
    for row, name in zip(history, step_streams(config, len(history))):
        if row["step"] > len(history) // 2:
            groups.setdefault(name, []).append(row)
    return [{"stream": name, "steps": len(rows)} | {key: sum(r[key] for r in rows) / len(rows)
                                                    for key in ("hard_ce_excess", "ce_excess", "multiplier")
                                                    if key in rows[0]}
            for name, rows in groups.items()]


def trajectory(history: list[dict], every: int = 10) -> list[dict]:
    """Every `every`-th step's offset, open fraction (noisy gates), CE excesses and lambda: what moves when."""
    keys = ("step", "context_length", "mean_offset", "open_fraction", "ce_excess", "hard_ce_excess", "multiplier")
    return [{key: row[key] for key in keys if key in row} for row in history
            if row["step"] % every == 0 or row["step"] == len(history)]


def summary(metrics: dict, config: SparsifyConfig | None = None) -> dict:
    """The figures the offset-scope comparison is about, from one stage's metrics.json (and its config, for the
    per-stream breakdown)."""
    by_length = [{k: s[k] for k in ("source", "context_length", "dense_ce", "sparse_ce", "ce_excess", "kl_per_token",
                                    "edge_fraction", "scored_tokens")}
                 | {"open_keys_per_query_mean": s["open_keys_per_query"]["mean"]}
                 for s in metrics.get("heldout_by_length", [])]
    history = metrics["history"]
    last = history[-min(len(history), 10):]
    return {
        "offset_scope": metrics["offset_scope"],
        "precision": metrics.get("precision"),
        "offset_final_mean": metrics["offset_final_mean"],
        "train_context_length": metrics["context_length"],
        "train_steps": metrics["train_steps"],
        "train_tokens_seen": metrics["train_tokens_seen"],
        "train_wall_seconds": metrics["train_wall_seconds"],
        "stage_wall_seconds": metrics["stage_wall_seconds"],
        **{key: metrics[key] for key in ("train_cpu_seconds", "stage_cpu_seconds", "threads") if key in metrics},
        **({"train_cpu_seconds_per_step": metrics["train_cpu_seconds"] / max(1, metrics["train_steps"])}
           if "train_cpu_seconds" in metrics else {}),
        "last_steps_mean": {key: sum(row[key] for row in last) / len(last)
                            for key in ("ce_excess", "hard_ce_excess", "open_fraction", "multiplier")
                            if key in last[0]},
        **({"train_mix": metrics["train_mix"], "train_lengths": metrics["train_lengths"]} if "train_mix" in metrics else {}),
        **({"last_half_by_stream": by_stream(history, config)} if config is not None else {}),
        "trajectory": trajectory(history),
        "heldout_by_length": by_length,
        "open_heads": metrics.get("open_heads"),
        "tasks": metrics.get("tasks"),
    }


def machine() -> str:
    """CPU model, cores and the widest x86 vector extension (bf16 is emulated without AVX-512 BF16 or AMX)."""
    model, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    vector = next((name for name in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if name in flags), "no AVX2")
    return f"{model}, {os.cpu_count()} cores, {vector}"


def record(stage_dirs: list[Path], tag: str) -> int:
    """Write the summary of each finished stage in `stage_dirs` as sparsify_offset_scope_<tag>.json."""
    runs = []
    for stage_dir in stage_dirs:
        try:
            metrics = json.loads((stage_dir / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            sys.exit(f"no finished sparsify stage in {stage_dir}: {err}")
        config = SparsifyConfig.model_validate(yaml.safe_load((stage_dir / stage.CONFIG_FILE).read_text()))
        runs.append({"recorded_from": str(stage_dir), **summary(metrics, config)})
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sparsify_offset_scope_{tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def run_checkpoint(run_dir: Path, checkpoint: Path | None = None, *, mmap: bool = False
                   ) -> tuple[SparsifyConfig, dict]:
    """The config saved in `run_dir` (a stage directory) and the state of `checkpoint` (default the run's last),
    refused unless that config wrote it."""
    saved = SparsifyConfig.model_validate(yaml.safe_load((run_dir / stage.CONFIG_FILE).read_text()))
    own = checkpoint is None
    checkpoint = run_dir / stage.CHECKPOINT_DIR / CHECKPOINT_NAME if own else checkpoint
    state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=mmap)
    if state["fingerprint"] != stage.training_fingerprint(saved):
        sys.exit(f"{run_dir}'s checkpoint was not written by the config saved beside it" if own
                 else f"{checkpoint} was not written by the config saved in {run_dir}")
    return saved, state


def resume_as(state: dict, config: SparsifyConfig, output_dir: Path) -> None:
    """Write `state` into `output_dir` under `config`'s fingerprint, so the stage there resumes from it."""
    state["fingerprint"] = stage.training_fingerprint(config)
    (output_dir / stage.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    torch.save(state, output_dir / stage.CHECKPOINT_DIR / CHECKPOINT_NAME)


def truncated_copy(run_dir: Path, config: SparsifyConfig, output_dir: Path) -> tuple[SparsifyConfig, dict]:
    """The config of `run_dir`'s run cut at its last checkpoint (train.steps = that step), with the checkpoint
    copied into `output_dir` under that config's fingerprint; refuses a run whose saved config differs from
    `config` in anything but eval, or whose checkpoint another config wrote."""
    saved, state = run_checkpoint(run_dir)
    if saved.model_dump(exclude={"eval"}) != config.model_dump(exclude={"eval"}):
        sys.exit(f"{run_dir} was trained with another config than the --set arguments give; pass the run's own")
    steps = int(state["step"])
    truncated = config.model_copy(update={"train": config.train.model_copy(update={"steps": steps})})
    resume_as(state, truncated, output_dir)
    return truncated, {"run": str(run_dir), "planned_steps": config.train.steps, "checkpoint_step": steps}


def branched_copy(run_dir: Path, checkpoint: Path, config: SparsifyConfig, output_dir: Path) -> dict:
    """Copy `checkpoint` (written by the run in `run_dir`) into `output_dir` under `config`'s fingerprint, so the
    stage resumes from it; refuses a config that differs from the run's in anything but controller, eval,
    train.steps, the constraint, the head cap, the task distillation, the closed heads and the long steps' lengths, a checkpoint another
    config wrote, and a step at or past `config.train.steps`."""
    saved, state = run_checkpoint(run_dir, checkpoint)
    kept = {"controller": True, "eval": True,
            "train": {"steps", "constraint", "head_cap", "head_cap_weight", "head_cap_through", "task_distill"},
            "gate": {"closed_heads"}, "data": {"long_context_length", "long_every"}}
    if saved.model_dump(exclude=kept) != config.model_dump(exclude=kept):
        sys.exit(f"{run_dir} was trained with another config than the --set arguments give in more than "
                 "controller, eval, train.steps, train.constraint, train.head_cap(_weight, _through), train.task_distill, "
                 "gate.closed_heads and data.long_context_length / long_every")
    if int(state["step"]) >= config.train.steps:
        sys.exit(f"{checkpoint} is at step {state['step']}: give train.steps beyond it")
    resume_as(state, config, output_dir)
    return {"run": str(run_dir), "checkpoint": str(checkpoint), "checkpoint_step": int(state["step"]),
            "run_controller": saved.controller.model_dump()}


def stopped(run_dir: Path, tag: str) -> int:
    """Write the training history of the run in `run_dir` (a stage directory) up to its last checkpoint."""
    config, state = run_checkpoint(run_dir, mmap=True)
    history = state["history"]
    last = history[-min(len(history), 10):]
    run = {"stopped_from": str(run_dir), "planned_steps": config.train.steps, "checkpoint_step": int(state["step"]),
           "offset_scope": config.gate.offset_scope, "precision": config.train.precision,
           "train_wall_seconds_to_checkpoint": history[-1]["seconds"],
           "last_steps_mean": {key: sum(row[key] for row in last) / len(last)
                               for key in ("ce_excess", "hard_ce_excess", "open_fraction", "multiplier")},
           "last_half_by_stream": by_stream(history, config),
           "trajectory": trajectory(history, every=1),
           "config": config.model_dump(mode="json", exclude={"eval"})}
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "runs": [run]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sparsify_offset_scope_{tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def paired(run_dirs: list[Path], first: int, last: int, tag: str) -> int:
    """Compare runs that trained on the same batches over steps first..last (see the module docstring)."""
    runs = [(run_dir, *run_checkpoint(run_dir, mmap=True)) for run_dir in run_dirs]
    data = runs[0][1].data
    if any(config.data != data or config.train.grad_accumulation != runs[0][1].train.grad_accumulation
           for _, config, _ in runs):
        sys.exit("--paired compares runs on the same batches: their data configs differ")
    streams = dict(enumerate(step_streams(runs[0][1], last), start=1))
    compared = []
    for run_dir, config, state in runs:
        rows = {row["step"]: row for row in state["history"]}
        if any(step not in rows for step in range(first, last + 1)):
            sys.exit(f"{run_dir}'s checkpoint (step {state['step']}) does not hold every step {first}-{last}")
        steps = [rows[step] for step in range(first, last + 1)]
        by_length: dict[int, list[float]] = {}
        by_stream_excess: dict[str, list[float]] = {}
        for row in steps:
            by_length.setdefault(row["context_length"], []).append(row["open_fraction"])
            by_stream_excess.setdefault(streams[row["step"]], []).append(row["hard_ce_excess"])
        compared.append({"run": str(run_dir), "controller": config.controller.model_dump(mode="json"),
                         "open_fraction_by_length": {length: sum(v) / len(v) for length, v in sorted(by_length.items())},
                         "hard_ce_excess_by_stream": {name: sum(v) / len(v) for name, v in by_stream_excess.items()},
                         "mean_offset_at_last": rows[last]["mean_offset"],
                         "multipliers_at_last": rows[last].get("multipliers", {"all": rows[last]["multiplier"]})})
    result = {"command": "python " + " ".join(sys.argv), "steps": [first, last],
              "open_fraction": "training gates (noisy), mean over the steps at each length", "runs": compared}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sparsify_paired_{tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scopes", nargs="+", default=["model", "head"], choices=["model", "layer", "head"])
    parser.add_argument("--set", action="append", default=[], help="sparsify config override, e.g. train.steps=100")
    parser.add_argument("--output", type=Path, default=ROOT / "runs" / "bench-offset-scope")
    parser.add_argument("--tag", default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--record", type=Path, nargs="+", default=None,
                        help="finished sparsify stage directories (holding metrics.json) to summarise instead of running")
    parser.add_argument("--truncate", type=Path, default=None,
                        help="an unfinished run's stage directory (one scope): evaluate it at its last checkpoint")
    parser.add_argument("--branch", type=Path, default=None,
                        help="a run's stage directory (one scope): continue it from a checkpoint under another controller")
    parser.add_argument("--branch-checkpoint", type=Path, default=None,
                        help="with --branch: a copy of the run's train_state.pt at the step to branch at (default "
                             "the run's last checkpoint)")
    parser.add_argument("--stopped", type=Path, default=None,
                        help="a stopped run's stage directory: record its checkpoint's history, no evaluation")
    parser.add_argument("--paired", type=Path, nargs="+", default=None,
                        help="stage directories of runs on the same batches (a run and its branches) to compare")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("FIRST", "LAST"), help="with --paired: the steps")
    args = parser.parse_args()
    if args.paired:
        if not args.steps:
            parser.error("--paired needs --steps FIRST LAST")
        return paired(args.paired, *args.steps, args.tag)
    if args.stopped:
        return stopped(args.stopped, args.tag)
    if args.record:
        return record(args.record, args.tag)
    if args.truncate and len(args.scopes) != 1:
        parser.error("--truncate evaluates one run: give the one scope it was trained with in --scopes")
    if args.branch and (len(args.scopes) != 1 or args.truncate):
        parser.error("--branch continues one run: give the one scope it was trained with in --scopes, no --truncate")
    if args.branch_checkpoint and not args.branch:
        parser.error("--branch-checkpoint needs --branch (the run that wrote it)")
    torch.set_num_threads(args.threads)
    overrides = [f"sparsify.{assignment}" for assignment in args.set]
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "threads": args.threads, "runs": []}
    for scope in args.scopes:
        config = load_config(preset="demo", overrides=[*overrides, f"sparsify.gate.offset_scope={scope}",
                                                       f"sparsify.train.threads={args.threads}"]).sparsify
        truncated_from = branched_from = None
        if args.truncate:
            config, truncated_from = truncated_copy(args.truncate, config, args.output / scope)
        if args.branch:
            branched_from = branched_copy(args.branch, args.branch_checkpoint or (
                args.branch / stage.CHECKPOINT_DIR / CHECKPOINT_NAME), config, args.output / scope)
        evaluate = task_evaluator(config.eval.task_prompts, config.eval.task_seed) if config.eval.task_prompts else None
        load_before, started, cpu_started = os.getloadavg(), time.perf_counter(), time.process_time()
        metrics = stage.run(config, args.output / scope, progress=False, evaluate_tasks=evaluate,
                            task_batches=task_distillation(config.train.task_distill))
        result["runs"].append({**summary(metrics, config),
                               **({"truncated_from": truncated_from} if truncated_from else {}),
                               **({"branched_from": branched_from} if branched_from else {}),
                               "command_wall_seconds": time.perf_counter() - started,
                               "command_cpu_seconds": time.process_time() - cpu_started,
                               "load_average_before": load_before, "load_average_after": os.getloadavg()})
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"sparsify_offset_scope_{args.tag}.json").write_text(json.dumps(result, indent=1))  # after each run
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
