"""Where an edge-patched pass spends its time: torch.profiler over the batched edge passes of one edge curve grid.

SmolLM2-135M (dense, fp32, one thread), `--n` IOI prompts in length batches, the edge curve's grid masks (top-k
by EAP score, component edges) run as `PromptSet.edge_metrics` (many masks per forward). Writes the top
operators by self CPU time (share of the profiled total) to --out with the command, the load and the machine.
Usage: nice -n 5 python bench/circuits_edge_pass_profile.py [--n 8] [--points 10] [--top 25] [--shapes]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from circuits.curves import PromptSet, count_grid  # noqa: E402
from circuits.hooks import prepare  # noqa: E402
from circuits.layout import top_k_mask  # noqa: E402
from prompts.batches import encode_prompts  # noqa: E402
from prompts.tasks import load_task  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts")
    parser.add_argument("--points", type=int, default=10, help="edge curve grid points")
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--shapes", action="store_true", help="one row per operator and input shapes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/circuits_edge_pass_profile_amd.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    model, tokenizer = load_model("smollm2-135m")
    prompts = PromptSet(prepare(model, True, "none", "frozen"), encode_prompts(load_task("ioi")[: args.n], tokenizer, 16))
    scores = prompts.edge_scores()
    allowed = prompts.prepared.layout.allowed()
    counts = count_grid(int(allowed.sum()), args.points)
    keeps = torch.stack([top_k_mask(scores, allowed, k) for k in counts])
    prompts.edge_metrics(keeps[:1])  # warm-up
    start = time.process_time()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes) as prof:
        prompts.edge_metrics(keeps)
    cpu_s = time.process_time() - start
    events = [e for e in prof.key_averages(group_by_input_shape=args.shapes) if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    record = {
        "command": "nice -n 5 python bench/circuits_edge_pass_profile.py " + " ".join(sys.argv[1:]),
        "model": "smollm2-135m (dense, fp32)", "task": "ioi", "n_prompts": args.n, "counts": counts,
        "threads": 1, "machine": "AMD EPYC 2-core AVX2, fp32", "cpu_s_profiled_run": cpu_s,
        "cpu_s_per_pass_under_profiler": cpu_s / len(counts),
        "top_ops_by_self_cpu": [{"op": e.key, "calls": e.count, "self_cpu_s": e.self_cpu_time_total / 1e6,
                                 "share": e.self_cpu_time_total / total}
                                | ({"input_shapes": str(e.input_shapes)} if args.shapes else {}) for e in top],
        "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    for row in record["top_ops_by_self_cpu"]:
        print(f"{row['share']:6.1%} {row['self_cpu_s']:7.2f} s {row['calls']:6d}  {row['op']} {row.get('input_shapes', '')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
