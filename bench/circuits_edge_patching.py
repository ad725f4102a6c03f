"""Edge patching before and after, side by side in one run on SmolLM2-135M (dense, IOI prompts, fp32).

"Before" is the circuits package and sparse_attention/hook_points.py of git revision `--before`, imported from
a temporary copy: at 45196e9 one patched forward per mask, every reader's removed input an einsum over all
writers; from 28118c3 on, many masks per forward, each replaced q/k/v input projected twice (shared, then per
head). It runs many masks per forward where its PromptSet has `edge_metrics`, else one per forward. "After" is
this checkout's, one mask per forward (unless --skip-one-mask) and many masks per forward
(`edge_patched_metrics`). Timed per pass (CPU seconds, time.process_time, one thread): the masks of an edge
curve's grid (top-k by EAP score, component edges and edges by token role) and single-edge removals (the
faithfulness check). Also the largest |metric difference| between before and after. Writes --out
(bench/results/circuits_edge_patching.json) with the command, the load and the machine.
Usage: nice -n 5 python bench/circuits_edge_patching.py [--n 8] [--points 10] [--faithfulness 16] [--before REV] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from circuits.curves import PromptSet, count_grid  # noqa: E402
from circuits.hooks import prepare  # noqa: E402
from circuits.layout import top_k_mask  # noqa: E402
from prompts.batches import encode_prompts  # noqa: E402
from prompts.tasks import load_task  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402

MACHINE = "AMD EPYC 2-core AVX2, fp32"
MODULES = ("__init__", "config", "layout", "hooks", "stats", "curves")


def before_package(revision: str, directory: Path):
    """The circuits package of `revision` as `circuits_before`, with that revision's hook_points as
    `circuits_before.hook_points` (its imports of both renamed)."""
    package = directory / "circuits_before"
    package.mkdir()
    for name, path in [*((name, f"circuits/{name}.py") for name in MODULES),
                       ("hook_points", "sparse_attention/hook_points.py")]:
        source = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        source = source.replace("from circuits.", "from circuits_before.")
        (package / f"{name}.py").write_text(source.replace("from sparse_attention import hook_points",
                                                           "from circuits_before import hook_points"))
    sys.path.insert(0, str(directory))
    return importlib.import_module("circuits_before.curves"), importlib.import_module("circuits_before.hooks")


def timed(fn) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="IOI prompts")
    parser.add_argument("--points", type=int, default=10, help="edge curve grid points")
    parser.add_argument("--faithfulness", type=int, default=16, help="single-edge removals")
    parser.add_argument("--before", default="45196e9", help="git revision of the 'before' circuits package")
    parser.add_argument("--edge-batch-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="time before and after this often, alternating "
                                                                   "(medians reported)")
    parser.add_argument("--skip-one-mask", action="store_true", help="do not time this checkout one mask per forward")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/circuits_edge_patching.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_start = Path("/proc/loadavg").read_text().split()[:3]

    model, tokenizer = load_model("smollm2-135m")
    prompts = load_task("ioi")[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        old_curves, old_hooks = before_package(args.before, Path(tmp))
        old = old_curves.PromptSet(old_hooks.prepare(model, True, "none", "frozen"),
                                   encode_prompts(prompts, tokenizer, 16))
    old_batched = hasattr(old, "edge_metrics")
    new = PromptSet(prepare(model, True, "none", "frozen"), encode_prompts(prompts, tokenizer, 16))
    layout = new.prepared.layout
    seconds, role_scores = timed(lambda: new.edge_scores(by_role=True))  # EAP, [U, V, R]
    print(f"EAP scores {seconds:.1f} s", flush=True)
    allowed = layout.allowed()
    role_allowed = allowed[:, :, None].expand(role_scores.shape).contiguous()
    cases = {}
    for name, scores, countable in (("edges", role_scores.sum(-1), allowed), ("role_edges", role_scores, role_allowed)):
        counts = count_grid(int(countable.sum()), args.points)
        cases[name] = (counts, torch.stack([top_k_mask(scores, countable, k) for k in counts]))
    generator = torch.Generator().manual_seed(0)
    flat = allowed.flatten().nonzero().squeeze(1)
    removed = flat[torch.randperm(len(flat), generator=generator)[: args.faithfulness]]
    singles = allowed.expand(len(removed), -1, -1).clone()
    singles.view(len(removed), -1)[torch.arange(len(removed)), removed] = False
    cases["faithfulness"] = (removed.tolist(), singles)

    results = {}
    for name, (counts, keeps) in cases.items():
        old_times, many_times = [], []
        for _ in range(args.repeats):  # before and after alternate, so a change of load hits both alike
            if old_batched:
                old_seconds, old_metrics = timed(lambda keeps=keeps: old.edge_metrics(keeps, args.edge_batch_tokens))
            else:
                old_seconds, old_metrics = timed(lambda keeps=keeps: torch.stack([old.prompt_metrics(keep_edges=k)
                                                                                      for k in keeps]))
            many_seconds, many_metrics = timed(lambda keeps=keeps: new.edge_metrics(keeps, args.edge_batch_tokens))
            old_times.append(old_seconds)
            many_times.append(many_seconds)
        old_seconds, many_seconds = statistics.median(old_times), statistics.median(many_times)
        passes = len(keeps)
        results[name] = {
            "passes": passes, "counts" if name != "faithfulness" else "removed_edges": counts,
            "before_cpu_s_per_pass": old_seconds / passes, "after_batched_cpu_s_per_pass": many_seconds / passes,
            "speedup_batched": old_seconds / many_seconds,
            "max_abs_metric_diff_vs_before": (many_metrics - old_metrics).abs().max().item(),
        }
        if args.repeats > 1:  # per pass: the median above, each repeat here
            results[name] |= {"before_cpu_s_per_pass_each": [t / passes for t in old_times],
                              "after_batched_cpu_s_per_pass_each": [t / passes for t in many_times]}
        if not args.skip_one_mask:
            one_seconds, one_metrics = timed(lambda keeps=keeps: torch.cat([new.edge_metrics(k[None], args.edge_batch_tokens)
                                                                           for k in keeps]))
            results[name] |= {"after_one_mask_per_forward_cpu_s_per_pass": one_seconds / passes,
                              "speedup_one_mask": old_seconds / one_seconds,
                              "max_abs_metric_diff_vs_before": max(results[name]["max_abs_metric_diff_vs_before"],
                                                                   (one_metrics - old_metrics).abs().max().item())}
        print(name, json.dumps(results[name]), flush=True)
    record = {
        "command": "nice -n 5 python bench/circuits_edge_patching.py " + " ".join(sys.argv[1:]),
        "model": "smollm2-135m (dense, fp32, frozen gate mode = no gates)", "task": "ioi", "n_prompts": args.n,
        "batches": [tuple(b.clean.shape) for b in new.batches], "before_revision": args.before,
        "before_batched": old_batched, "machine": MACHINE,
        "edge_batch_tokens": args.edge_batch_tokens, "threads": 1,
        "loadavg_start": load_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
