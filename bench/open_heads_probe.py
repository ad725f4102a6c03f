"""What the heads that stay open cost to close: a sparse checkpoint's held-out CE and KL against the original
when its most open heads (metrics.json's `open_heads`, over 20% open at 512 tokens) are closed one at a time,
all together, or have their gate offsets lowered by a few logits, and when given sets of heads are closed
together (--sets), with deterministic gates.

    python bench/open_heads_probe.py runs/.../sparsify --shifts 2 4 8

The stage directory holds metrics.json, sparsify_config.yaml and model/ (the gated checkpoint). Held-out blocks
are the stage's own (every source it trained on or evaluated, `eval.long_blocks` at the length). A closed head
has every gate shut (its offset -1e4): its queries attend to nothing and it writes zero. Lowering an offset
by s closes every edge whose gate logit is below s. With --tasks N, each variant is also scored on N prompts
of every task (clean logit difference and accuracy against the original, the stage's own task evaluation with
its seed), since a head that is free to close by held-out CE may still carry a task.
Writes bench/results/open_heads_probe_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prompts.metrics import task_evaluator  # noqa: E402
from sparse_attention.config import SparsifyConfig, parse_head  # noqa: E402
from sparse_attention.evaluate import compare_on_heldout  # noqa: E402
from sparse_attention.gated_attention import load_gated_model  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402
from sparse_attention.stage import CONFIG_FILE, MODEL_DIR, load_comparison_blocks  # noqa: E402

CLOSED = -1e4  # a gate offset no score reaches: every gate of the head shut


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def variants(heads: list[tuple[int, int]], shifts: list[float], sets: list[list[tuple[int, int]]]
             ) -> list[tuple[str, dict[tuple[int, int], float]]]:
    """(name, {(layer, head): offset change or CLOSED}) for every probe, the unchanged model first."""
    out = [("unchanged", {})]
    out += [(f"close {head_name(*h)}", {h: CLOSED}) for h in heads]
    if heads:
        out.append(("close all listed", {h: CLOSED for h in heads}))
    out += [(f"lower all listed by {s:g}", {h: -s for h in heads}) for s in shifts]
    out += [("close " + " ".join(head_name(*h) for h in chosen), {h: CLOSED for h in chosen}) for chosen in sets]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", type=Path, help="a sparsify stage directory (metrics.json, config, model/)")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--shifts", type=float, nargs="*", default=[2.0, 4.0, 8.0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sets", nargs="*", default=[],
                        help="more variants, each a comma-separated set of heads closed together, e.g. L2H3,L2H4")
    parser.add_argument("--only-sets", action="store_true", help="the unchanged model and --sets only")
    parser.add_argument("--tasks", type=int, default=0, metavar="N",
                        help="also score every task on N prompts per variant (0: held-out CE and KL only)")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = SparsifyConfig.model_validate(yaml.safe_load((args.stage_dir / CONFIG_FILE).read_text()))
    metrics = json.loads((args.stage_dir / "metrics.json").read_text())
    heads = [(h["layer"], h["head"]) for h in metrics["open_heads"]["heads"]]
    if not heads:
        parser.error(f"{args.stage_dir}/metrics.json lists no open heads")
    gated, tokenizer = load_gated_model(args.stage_dir / MODEL_DIR)
    reference, _ = load_model(config.model.name, tiny=config.model.tiny)
    reference.eval()
    blocks = load_comparison_blocks(config, tokenizer, [args.length])
    base = gated.offsets_per_head.detach().clone()  # [layer, head]
    gated.offsets = torch.nn.Parameter(base.clone(), requires_grad=False)  # one offset per head for the probe
    started, cpu_started, load_before = time.perf_counter(), time.process_time(), os.getloadavg()
    rows = []
    try:
        sets = [[parse_head(name) for name in chosen.split(",")] for chosen in args.sets]
    except ValueError as exc:
        parser.error(str(exc))
    probes = variants([] if args.only_sets else heads, [] if args.only_sets else args.shifts, sets)
    evaluate_tasks = task_evaluator(args.tasks, config.eval.task_seed) if args.tasks else None
    for name, changes in probes:
        offsets = base.clone()
        for (layer, head), change in changes.items():
            offsets[layer, head] = CLOSED if change == CLOSED else offsets[layer, head] + change
        gated.offsets.data.copy_(offsets)
        for (source, _), source_blocks in blocks.items():
            with torch.no_grad():
                compared = compare_on_heldout(reference, gated, source_blocks, args.batch_size, source)
            per_head = compared.edges.fraction_per_head
            rows.append({"variant": name, "source": source, "ce_excess": compared.sparse_ce - compared.dense_ce,
                         "kl_per_token": compared.kl_per_token, "edge_fraction": compared.edges.edge_fraction,
                         "listed_heads_edge_fraction": {head_name(*h): float(per_head[h]) for h in heads},
                         "scored_tokens": compared.tokens})
            print(json.dumps(rows[-1]), flush=True)
        if evaluate_tasks is not None:
            with torch.no_grad():
                scores = evaluate_tasks(reference, gated.eval().set_mode("eval"), tokenizer)
            rows.append({"variant": name, "tasks": {task: {"logit_diff_ratio": row["logit_diff_ratio"],
                                                           "accuracy_ratio": row["accuracy_ratio"],
                                                           "sparse": row["sparse"], "dense": row["dense"]}
                                                    for task, row in scores.items() if task != "seed"}})
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python " + " ".join(sys.argv), "stage_dir": str(args.stage_dir), "length": args.length,
              "heads": [head_name(*h) for h in heads], "closed_offset": CLOSED, "rows": rows,
              "wall_seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "threads": 1}
    path = ROOT / "bench" / "results" / f"open_heads_probe_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
