"""Dense vs sparse component circuits per task: `python -m circuits --tasks ioi --sparse DIR --out FILE`.

Loads the dense model and (optionally) a gated checkpoint in eval mode, traces each task's circuit on
the first n prompts of prompts/data/{task}.jsonl, and writes the results and dense/sparse ratios as JSON
after every task.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from circuits.config import CURVE_KINDS, ComponentCircuitConfig
from circuits.curves import compare, compare_per_prompt, run, run_per_prompt
from prompts.tasks import TASKS, load_task
from sparse_attention.gated_attention import load_gated_model
from sparse_attention.models import load_model


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m circuits", description="dense vs sparse component circuits, per task")
    parser.add_argument("--tasks", nargs="+", default=["ioi"], choices=TASKS)
    parser.add_argument("--n", type=int, default=20, help="prompts per task (the first n of its file)")
    parser.add_argument("--dense", default="smollm2-135m", help="model name for load_model")
    parser.add_argument("--sparse", type=Path, help="gated checkpoint directory (load_gated_model), eval mode")
    parser.add_argument("--joint-qkv", action="store_true", help="one input per head instead of q/k/v")
    parser.add_argument("--points", type=int, default=20, help="counts on each curve")
    parser.add_argument("--gate-gradient", choices=["none", "straight_through"], default="straight_through",
                        help="gates' gradient when ranking edges of the sparse model by EAP")
    parser.add_argument("--out", type=Path, required=True, help="JSON file: results, ratios, config")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--per-prompt", action="store_true",
                        help="one circuit per prompt instead of one over all: per-prompt sizes, ratio with a bootstrap CI")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = ComponentCircuitConfig(split_qkv=not args.joint_qkv, curve_points=args.points,
                                    gate_gradient=args.gate_gradient)
    models = {"dense": load_model(args.dense)}
    if args.sparse is not None:
        sparse, tokenizer = load_gated_model(args.sparse)
        models["sparse"] = (sparse.set_mode("eval"), tokenizer)
    out: dict = {"models": {"dense": args.dense, "sparse": str(args.sparse) if args.sparse else None},
                 "config": config.model_dump(), "tasks": {}}
    for task in args.tasks:
        prompts = load_task(task)[: args.n]
        if args.per_prompt:
            per_prompt = {name: run_per_prompt(config, model, tokenizer, prompts)
                          for name, (model, tokenizer) in models.items()}
            out["tasks"][task] = {"per_prompt": {name: [r if isinstance(r, str) else r.to_json() for r in results]
                                                 for name, results in per_prompt.items()}}
            if "sparse" in per_prompt:
                summary = compare_per_prompt(per_prompt["dense"], per_prompt["sparse"])
                out["tasks"][task]["per_prompt_comparison"] = summary
                for kind in CURVE_KINDS:
                    if kind in summary:
                        k = summary[kind]
                        print(f"{task} {kind}: {k['n_pairs']}/{summary['n_prompts']} prompts, dense/sparse "
                              f"{k['ratio']:.2f} (CI {k['ci_low']:.2f}-{k['ci_high']:.2f})", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=2) + "\n")
            continue
        results = {name: run(config, model, tokenizer, prompts) for name, (model, tokenizer) in models.items()}
        out["tasks"][task] = {name: result.to_json() for name, result in results.items()}
        if "sparse" in results:
            out["tasks"][task]["comparison"] = compare(results["dense"], results["sparse"])
        for name, result in results.items():
            print(f"{task} {name}: metric clean {result.metric_clean:.3f} corrupted {result.metric_corrupted:.3f}; "
                  f"heads to {config.target}: {result.heads.count_at_target}/{result.heads.total}, "
                  f"edges: {result.edges.count_at_target}/{result.edges.total}" + (
                      "" if result.position_edges is None else
                      f", edges by position: {result.position_edges.count_at_target}/{result.position_edges.total}"),
                  flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every task, so a long run keeps results


if __name__ == "__main__":
    main()
