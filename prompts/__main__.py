"""Clean/corrupted prompt sets for circuit discovery: IOI, Greater-Than, Docstring, antonyms, induction.

`python -m prompts --write` generates the SmolLM2 sets into prompts/data/{task}.jsonl;
`python -m prompts --performance N` measures the dense model on the first N prompts per task
(prompts/data/task_performance.json).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from prompts.metrics import logits_fn, task_performance
from prompts.tasks import (
    DEFAULT_N_PROMPTS,
    DEFAULT_SEED,
    PROMPT_DIR,
    TASK_NOTES,
    TASKS,
    generate_task,
    load_task,
    task_generator,
    task_path,
    write_task,
)
from sparse_attention.models import load_model


def _iter_tasks(names: Sequence[str] | None) -> Iterator[str]:
    for name in names or TASKS:
        task_generator(name)
        yield name


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prompts", description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="generate the prompt sets into prompts/data/")
    parser.add_argument("--performance", type=int, metavar="N", default=0,
                        help="measure the dense model on the first N prompts per task")
    parser.add_argument("--tasks", nargs="*", help=f"subset of {', '.join(TASKS)}")
    parser.add_argument("--n", type=int, default=DEFAULT_N_PROMPTS, help="prompts per task")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=PROMPT_DIR)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is far faster than 2 on a shared, oversubscribed CPU)")
    args = parser.parse_args(argv)
    if not (args.write or args.performance):
        parser.error("nothing to do: give --write and/or --performance N")

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    if args.write:
        for name in _iter_tasks(args.tasks):
            prompts = generate_task(name, tokenizer, args.n, args.seed)
            write_task(prompts, task_path(name, args.out))
            print(f"{name}: {len(prompts)} prompts -> {task_path(name, args.out)}")
    if args.performance:
        path = args.out / "task_performance.json"
        results = json.loads(path.read_text()) if path.is_file() else {}
        for name in _iter_tasks(args.tasks):
            prompts = load_task(name, args.out)[: args.performance]
            results[name] = task_performance(logits_fn(model), tokenizer, prompts)
            print(name, json.dumps(results[name]))
        results["_meta"] = {"model": args.model, "bos_prefixed": True, "seed": args.seed,
                            "metric": "mean correct logit - mean incorrect logit at the last position; "
                                      "accuracy = share of prompts with metric > 0",
                            "notes": TASK_NOTES}
        path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
