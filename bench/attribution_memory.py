"""Attribution peak memory (RSS) and time against prompt length, SmolLM2-135M (dense) with a small trained CLT.

    nice -n 5 .venv/bin/python bench/attribution_memory.py                    # 64,128,256,512,1024 tokens
    nice -n 5 .venv/bin/python bench/attribution_memory.py --lengths 64,128 --timeout 600

The CLT: `--clt DIR` if given; else the one this benchmark trained before in `--work`; else it trains one
there first with a tiny budget (the CLT stage, `TINY_CLT` below: 128 features per layer, 60 steps of 256
tokens on the Python docs at 128 tokens per block): a trained CLT's sparsity and decoder norms, not a
demo-quality dictionary. Its stage metrics are recorded.

Each length is one fresh process (bench/attribution_step.py's worker: load the model and CLT, then the
stage's own per-prompt step `Attributor.attribute` once, forced, into a scratch store, phases timed),
one torch thread, niced like this driver, killed after `--timeout` seconds. Recorded per length: peak
RSS (ru_maxrss) and RSS after loading, CPU and wall seconds per phase (graph, head loadings, QK, write),
the outcome (a graph, or the failure the stage recorded, e.g. MemoryBudgetError) and the load average.
The prompt of n tokens is IOI sentences cut to n tokens. Goal (issue 19): a 1,024-token graph within
8 GB, memory about linear in positions. Results: bench/results/attribution_memory_smollm2.json, written
after every length; a rerun replaces the entries of the lengths it runs and keeps the others (each entry
holds its own command, budget and load).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):  # run as a script: bench/ is on the path, not the repository root
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from attribution_step import git_head, prompt_of_length, run_worker  # noqa: E402

TINY_CLT = {
    "data": {"source": "python-docs", "context_length": 128, "max_train_tokens": 100_000,
             "max_heldout_tokens": 10_000},
    "clt": {"n_features": 128},
    "harvest": {"batch_size": 4, "buffer_tokens": 2048},
    "train": {"steps": 60, "batch_tokens": 256, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 60,
              "sparsity_coefficient": 0.005, "threads": 1},
    "eval": {"heldout_blocks": 4, "batch_size": 2},
    "precision": "fp32",  # this CPU has no native bf16 (the stage refuses it)
}


def tiny_clt(model: str, directory: Path) -> dict:
    """Train the tiny-budget CLT into `directory` (unless a finished one is there); its stage metrics."""
    from sparse_attention.config import ModelSpec
    from transcoders.stage import METRICS_FILE, CLTStageConfig, run

    metrics_file = directory / METRICS_FILE
    if metrics_file.is_file():
        return {**json.loads(metrics_file.read_text()), "trained_now": False}
    started = time.perf_counter()
    metrics = run(CLTStageConfig.model_validate(TINY_CLT), ModelSpec(name=model), directory, progress=False)
    return {**metrics, "trained_now": True, "bench_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clt", type=Path, help="a trained CLT directory (default: train a tiny one in --work)")
    parser.add_argument("--lengths", default="64,128,256,512,1024", help="prompt lengths in tokens, in this order")
    parser.add_argument("--max-feature-nodes", type=int, default=1024)
    parser.add_argument("--memory-budget-gb", type=float, default=6.0,
                        help="the stage's memory_budget_gb: what a prompt may hold beyond the model and CLT")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per length (its process is killed then)")
    parser.add_argument("--no-attention", action="store_true",
                        help="the graph alone (freeze, graph, prune, write): no head loadings or QK attribution")
    parser.add_argument("--model-dir", type=Path, help="a gated (sparse) checkpoint directory instead of --model's "
                        "dense weights (sparsify's model/model)")
    parser.add_argument("--variant", default="dense", help="the variant the graphs are stored under")
    parser.add_argument("--model-label", default="", help="what the model is, recorded in the settings")
    parser.add_argument("--work", type=Path, default=Path("/tmp/attribution-memory-bench"))
    parser.add_argument("--output", type=Path,
                        default=ROOT / "bench" / "results" / "attribution_memory_smollm2.json")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = "1"  # the workers inherit it (and set torch's threads to 1 themselves)
    import torch

    from attribution.replacement import tokenize_prompt
    from sparse_attention.models import load_model

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["nice", "-n", str(os.nice(0)), Path(sys.executable).name, *sys.argv]),
        "code": git_head(),
        "machine": {"cpus": os.cpu_count(), "threads": 1, "niceness": os.nice(0), "torch": torch.__version__,
                    "memory_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
                    "load_average_before": os.getloadavg()},
        "settings": {"model": args.model, "max_feature_nodes": args.max_feature_nodes,
                     "memory_budget_gb": args.memory_budget_gb, "timeout_s": args.timeout, "variant": args.variant,
                     "model_dir": str(args.model_dir) if args.model_dir else None, "model_label": args.model_label,
                     "attention": not args.no_attention},
    }
    if args.clt is None:
        clt_dir = args.work / "clt"
        metrics = tiny_clt(args.model, clt_dir)
        report["clt"] = {"dir": str(clt_dir), "trained_by_this_benchmark": True, "config": TINY_CLT,
                         **{key: metrics.get(key) for key in ("trained_now", "bench_seconds", "n_layers", "n_features",
                                                              "nmse_per_layer", "l0_per_layer", "ce_recovered_fraction",
                                                              "train_steps", "train_tokens_seen",
                                                              "stage_wall_seconds")},
                         "load_average_after_training": os.getloadavg()}
    else:
        clt_dir = args.clt
        report["clt"] = {"dir": str(clt_dir), "trained_by_this_benchmark": False}
    _, tokenizer = load_model(args.model)
    asked = [int(n) for n in args.lengths.split(",") if n]
    earlier = json.loads(args.output.read_text()).get("lengths", []) if args.output.is_file() else []
    report["lengths"] = [entry for entry in earlier if entry["n_tokens_asked"] not in asked]
    for n_tokens in asked:
        prompt = prompt_of_length(tokenizer, n_tokens)
        job = {"model": args.model, "max_feature_nodes": args.max_feature_nodes,
               "memory_budget_gb": args.memory_budget_gb, "clt_dir": str(clt_dir), "code_root": str(ROOT),
               "prompt": prompt, "repeats": 0, "out_dir": str(args.work / f"length_{n_tokens}"),
               "attention": not args.no_attention, "variant": args.variant,
               "model_dir": str(args.model_dir) if args.model_dir else None}
        load_before = os.getloadavg()
        result = run_worker(job, args.work, args.timeout)
        entry = {"n_tokens_asked": n_tokens, "n_tokens": len(tokenize_prompt(tokenizer, prompt)),
                 "command": report["command"], "code": report["code"], "memory_budget_gb": args.memory_budget_gb,
                 "attention": not args.no_attention, "clt_dir": str(clt_dir),
                 "load_average_before": load_before, "load_average_after": os.getloadavg(), **result}
        report["lengths"] = sorted([*report["lengths"], entry], key=lambda e: e["n_tokens_asked"])
        outcome = result.get("runs", [{}])[-1].get("outcome", {})
        print(f"[{n_tokens} tokens] peak {result.get('peak_rss_mb')} MB in {result.get('process_seconds'):.0f} s, "
              f"{outcome.get('status')} {outcome.get('error', result.get('error', ''))[:200]}", flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
    report["machine"]["load_average_after"] = os.getloadavg()
    args.output.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
