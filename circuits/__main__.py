"""Dense vs sparse component circuits per task: `python -m circuits --tasks ioi --sparse DIR --out FILE`.

Loads the dense model and (optionally) a gated checkpoint in eval mode, traces each task's circuit on
the first n prompts of prompts/data/{task}.jsonl in each gate mode (the headline `--gates` first), and
writes the results and dense/sparse ratios as JSON after every task and mode. `--reuse-dense FILE` takes the
dense model's circuits from an earlier output of this command (same dense model, prompts and circuit config),
so one dense trace serves several sparse checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from circuits.config import CURVE_KINDS, GATE_MODES, ComponentCircuitConfig
from circuits.curves import CircuitResult, compare, compare_per_prompt, gate_modes, run, run_per_prompt
from prompts.tasks import TASKS, TaskPrompt, load_task
from runtime.precision import PrecisionError, check_precision
from sparse_attention.gated_attention import load_gated_model
from sparse_attention.models import load_model


def _config(args: argparse.Namespace) -> ComponentCircuitConfig:
    return ComponentCircuitConfig(
        split_qkv=not args.joint_qkv, curve_points=args.points, dense_points=args.dense_points,
        gate_gradient=args.gate_gradient, gates=args.gates, other_gates=not args.headline_only,
        head_ranking=args.head_ranking, edge_ranking=args.edge_ranking, ig_steps=args.ig_steps,
        faithfulness_edges=args.faithfulness_edges, min_prompt_gap=args.min_prompt_gap,
        min_clean_logit_diff=args.min_logit_diff, min_clean_accuracy=args.min_accuracy,
        role_edges=not args.no_role_edges, batch_size=args.batch_size, bootstrap_samples=args.bootstrap,
        precision=args.precision)


# fields that cannot change a model without gates: its circuits are the same under every value
GATE_ONLY_FIELDS = ("gates", "other_gates", "gate_gradient")


def prompts_sha256(prompts: Sequence[TaskPrompt]) -> str:
    return hashlib.sha256("\n".join(p.model_dump_json() for p in prompts).encode()).hexdigest()


def reused_dense(path: Path, dense: str, config: ComponentCircuitConfig, per_prompt: bool,
                 prompts: dict[str, list[TaskPrompt]]) -> dict[str, dict]:
    """{task: {"pooled" or "per_prompt": the dense result(s)}} from an earlier output of this command, checked to
    come from the same dense model, circuit config (but its gate-only fields) and prompts; ValueError if not."""
    try:
        earlier = json.loads(path.read_text())
        earlier_config = {k: v for k, v in earlier["config"].items() if k not in GATE_ONLY_FIELDS}
        earlier_dense, hashes = earlier["models"]["dense"], earlier.get("prompts_sha256", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is not an output of `python -m circuits` ({type(err).__name__}: {err})") from None
    if earlier_dense != dense:
        raise ValueError(f"{path} traced dense model {earlier_dense!r}, not {dense!r}")
    wanted = {k: v for k, v in json.loads(config.model_dump_json()).items() if k not in GATE_ONLY_FIELDS}
    if differ := sorted(k for k in wanted.keys() | earlier_config.keys() if wanted.get(k) != earlier_config.get(k)):
        raise ValueError(f"{path} used another circuit config: " + ", ".join(
            f"{k} {earlier_config.get(k)!r} there, {wanted.get(k)!r} here" for k in differ))
    kind = "per_prompt" if per_prompt else "pooled"
    found: dict[str, dict] = {}
    for task, task_prompts in prompts.items():
        if hashes.get(task) != prompts_sha256(task_prompts):
            raise ValueError(f"{path} traced other {task} prompts than these {len(task_prompts)} (or none)")
        for entry in earlier["tasks"].get(task, {}).values():
            saved = entry.get("per_prompt", {}).get("dense") if per_prompt else entry.get("dense")
            if saved is not None:
                found[task] = {kind: [r if isinstance(r, str) else CircuitResult.from_json(r) for r in saved]
                               if per_prompt else CircuitResult.from_json(saved)}
                break
        else:
            raise ValueError(f"{path} holds no {'per-prompt ' if per_prompt else ''}dense circuit of {task}")
    return found


def _ci(pair) -> str:
    return "n/a" if pair is None or pair[0] != pair[0] else f"{pair[0]:.3g}-{pair[1]:.3g}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m circuits", description="dense vs sparse component circuits, per task")
    parser.add_argument("--tasks", nargs="+", default=["ioi"], choices=TASKS)
    parser.add_argument("--n", type=int, default=20, help="prompts per task (the first n of its file)")
    parser.add_argument("--dense", default="smollm2-135m", help="model name for load_model")
    parser.add_argument("--sparse", type=Path, help="gated checkpoint directory (load_gated_model), eval mode")
    parser.add_argument("--joint-qkv", action="store_true", help="one input per head instead of q/k/v")
    parser.add_argument("--points", type=int, default=20, help="counts on each curve's geometric grid")
    parser.add_argument("--dense-points", type=int, default=16, help="counts added between first crossing and stays-above")
    parser.add_argument("--gates", choices=GATE_MODES, default="frozen", help="headline gate mode (see circuits/README.md)")
    parser.add_argument("--headline-only", action="store_true", help="skip the other gate mode")
    parser.add_argument("--head-ranking", choices=["exact", "eap"], default="exact")
    parser.add_argument("--edge-ranking", choices=["eap_ig", "eap"], default="eap_ig")
    parser.add_argument("--ig-steps", type=int, default=5, help="EAP-IG interpolation points")
    parser.add_argument("--gate-gradient", choices=["none", "straight_through"], default="straight_through",
                        help="gates' gradient when ranking a gated model with recomputed gates")
    parser.add_argument("--faithfulness-edges", type=int, default=32, help="edges patched exactly to check the ranking")
    parser.add_argument("--min-prompt-gap", type=float, default=0.5, help="per-prompt: drop prompts whose clean - "
                                                                          "corrupted logit diff is under this")
    parser.add_argument("--min-logit-diff", type=float, default=1.0, help="behaviour gate: mean clean logit diff")
    parser.add_argument("--min-accuracy", type=float, default=0.8, help="behaviour gate: clean accuracy")
    parser.add_argument("--no-role-edges", action="store_true", help="skip the edges-by-token-role curve")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs")
    parser.add_argument("--out", type=Path, required=True, help="JSON file: results, ratios, config")
    parser.add_argument("--reuse-dense", type=Path, metavar="FILE",
                        help="an earlier --out of this command: its dense circuits instead of tracing them again")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="every forward and gradient pass (bf16 needs bfloat16 hardware; see circuits/config.py)")
    parser.add_argument("--per-prompt", action="store_true",
                        help="one circuit per prompt instead of one over all: per-prompt sizes, ratio with a bootstrap CI")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = _config(args)
    try:
        check_precision(config.precision)
    except PrecisionError as err:
        parser.error(str(err))
    prompts = {task: load_task(task)[: args.n] for task in args.tasks}
    reused: dict[str, dict] = {}
    if args.reuse_dense is not None:
        try:
            reused = reused_dense(args.reuse_dense, args.dense, config, args.per_prompt, prompts)
        except ValueError as err:
            parser.error(f"--reuse-dense: {err}")
    models = {"dense": load_model(args.dense)}
    if args.sparse is not None:
        sparse, tokenizer = load_gated_model(args.sparse)
        models["sparse"] = (sparse.set_mode("eval"), tokenizer)
    modes = gate_modes(config, models["sparse"][0]) if "sparse" in models else [config.gates]
    out: dict = {"command": "python -m circuits " + shlex.join(sys.argv[1:] if argv is None else argv),
                 "models": {"dense": args.dense, "sparse": str(args.sparse) if args.sparse else None},
                 "config": config.model_dump(), "headline_gates": config.gates, "tasks": {},
                 "prompts_sha256": {task: prompts_sha256(p) for task, p in prompts.items()},
                 "dense_reused_from": str(args.reuse_dense) if args.reuse_dense else None}

    def save() -> None:  # after every task and mode, so a long run keeps its results
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")

    for task in args.tasks:
        out["tasks"][task] = {}
        dense_results: dict = reused.get(task, {})  # the dense model has no gates: one result serves every mode
        for mode in modes:
            entry = out["tasks"][task].setdefault(mode, {})
            if args.per_prompt:
                results = {"dense": dense_results.get("per_prompt")}
                if results["dense"] is None:
                    results["dense"] = dense_results["per_prompt"] = run_per_prompt(config, *models["dense"], prompts[task])
                if "sparse" in models:
                    results["sparse"] = run_per_prompt(config, *models["sparse"], prompts[task], mode)
                entry["per_prompt"] = {name: [r if isinstance(r, str) else r.to_json() for r in rs]
                                       for name, rs in results.items()}
                if "sparse" in results:
                    summary = entry["per_prompt_comparison"] = compare_per_prompt(
                        results["dense"], results["sparse"], config.bootstrap_samples, seed=config.seed)
                    print(f"{task} [{mode}] dropped (gap < {config.min_prompt_gap}): {summary['dropped_small_gap']}")
                    for kind in CURVE_KINDS:
                        if kind in summary:
                            k = summary[kind]
                            print(f"{task} [{mode}] {kind}: {k['n_pairs']}/{summary['n_prompts']} prompts, dense/sparse "
                                  f"{k['ratio']:.2f} (CI {k['ci_low']:.2f}-{k['ci_high']:.2f})", flush=True)
                save()
                continue
            results = {"dense": dense_results.get("pooled")}
            if results["dense"] is None:
                results["dense"] = dense_results["pooled"] = run(config, *models["dense"], prompts[task])
            if "sparse" in models:
                results["sparse"] = run(config, *models["sparse"], prompts[task], mode)
            entry.update({name: result.to_json() for name, result in results.items()})
            for name, result in results.items():
                print(f"{task} [{mode}] {name}: metric clean {result.metric_clean:.3f} (accuracy "
                      f"{result.accuracy_clean:.2f}) corrupted {result.metric_corrupted:.3f}; to {config.target}: "
                      + ", ".join(f"{kind} {curve.count_at_target} (stays above {curve.count_stays_above})/{curve.total}"
                                  for kind in CURVE_KINDS if (curve := getattr(result, kind)) is not None)
                      + f"; faithfulness {result.faithfulness}", flush=True)
            if "sparse" in results:
                summary = entry["comparison"] = compare(results["dense"], results["sparse"])
                print(f"{task} [{mode}] behaviour gate: {summary['behaviour_gate']}")
                for kind in CURVE_KINDS:
                    if kind in summary:
                        k = summary[kind]
                        print(f"{task} [{mode}] {kind}: dense/sparse {k['ratio']} (CI {_ci(k.get('ratio_first_ci'))}), "
                              f"stays above {k['ratio_stays_above']} (CI {_ci(k.get('ratio_stays_above_ci'))})",
                              flush=True)
            save()


if __name__ == "__main__":
    main()
