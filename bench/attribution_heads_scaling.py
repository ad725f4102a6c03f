"""Head-loading time and memory against prompt length on the tiny model (fixed node cap: 64 features) or
SmolLM2-135M, this checkout beside an earlier revision, each length in a fresh process per side: a cheap
check of how head loadings scale with positions.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/attribution_heads_scaling.py 4,8,16,32 64 \\
        --before 28118c3 --output bench/results/attribution_heads_scaling_tiny_amd.json
    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/attribution_heads_scaling.py 64,128,256 1024 \\
        --model smollm2-135m --before ffe8521 --output bench/results/attribution_heads_scaling_smollm2_amd.json

Arguments: repeats of "The cat sat on the mat. " (97, 193, 385, 769 tokens with the tiny tokenizer), or with
`--model smollm2-135m` prompt lengths in tokens (IOI sentences, bench/attribution_step.py's
`prompt_of_length`), and the head-loading memory budget in MiB. SmolLM2 runs with a random CLT whose
thresholds are calibrated on the prompt itself (bench/attribution_vs_circuit_tracer.py's `calibrated_clt`,
seed 0): `--features` per layer, `--density` of them firing, so --features x --density active features per
token per layer (a proxy for a trained CLT's L0, default 512 x 0.04 = 20.5), max_feature_nodes 1024. Per (length, side): the graph's CPU seconds, head loadings' CPU seconds
(time.process_time, no profiler), the peak RSS head loadings add over the RSS before them (the high-water
mark reset through /proc/self/clear_refs just before), and the edges, targets, sources and chunk plan.
`--profile` adds, for this checkout only, a second, profiled call's cumulative seconds and calls per heads.py
function (profiling inflates them: read them as shares). "before" runs the same worker with the revision's
tree (git archive) first on sys.path, so each side runs its own attribution code.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The cat sat on the mat. "
FUNCTIONS = ("head_side_gradients", "head_outputs", "_head_parts", "_main_pairs", "_layer_rows", "_block_loadings",
             "add_mlp_writes")

WORKER = r"""
import cProfile, json, pstats, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[2])  # this checkout's tests (the tiny model and CLT)
import torch
torch.set_num_threads(1)
from attribution.config import AttentionAttributionConfig, GraphConfig
from attribution.graph import attribute
from attribution.heads import LoadingShape, head_loadings, plan_head_chunks
from attribution.nodes import build_replacement, transcoder_weights
from attribution.prune import prune
from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt
from attribution.stage import kept_edges
from sparse_attention.models import tiny_model
from tests.test_attribution import N_FEATURES, TINY, random_clt

def status_bytes(field):
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024

count, budget, profiled = int(sys.argv[3]), int(sys.argv[4]) * 2**20, sys.argv[5] == "1"
job = json.loads(sys.argv[7])
if job["model"] == "tiny":
    model, tokenizer = tiny_model(TINY)
    weights = extract_weights(model)
    clt = random_clt(TINY.n_layers, TINY.d_model, N_FEATURES, seed=0)
    frozen = freeze_prompt(model, tokenize_prompt(tokenizer, sys.argv[6] * count))
else:
    sys.path.insert(2, sys.argv[2] + "/bench")
    from attribution_step import prompt_of_length
    from attribution_vs_circuit_tracer import calibrated_clt
    from sparse_attention.models import load_model
    model, tokenizer = load_model(job["model"])
    weights = extract_weights(model)
    frozen = freeze_prompt(model, tokenize_prompt(tokenizer, prompt_of_length(tokenizer, count)))
    clt = calibrated_clt(weights, frozen, job["features"], job["density"], seed=0)
lrm = build_replacement(weights, transcoder_weights(clt, weights), frozen)
started = time.process_time()
graph = attribute(lrm, GraphConfig(max_feature_nodes=job["max_feature_nodes"]))
graph_cpu = time.process_time() - started
pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos, row_nodes=graph.row_nodes)
targets, sources, _ = kept_edges(graph, pruned)
shape = LoadingShape(graph.n_pos, weights.d_model, lrm.n_layers, weights.n_heads)
chunks = plan_head_chunks(shape, len(targets.unique()), len(sources.unique()), budget)
config = AttentionAttributionConfig()
open("/proc/self/clear_refs", "w").write("5")  # the peak restarts here
rss_before = status_bytes("VmRSS")
started = time.process_time()
loadings = head_loadings(lrm, graph, targets, sources, config, memory_budget=budget)
heads_cpu = time.process_time() - started
added = status_bytes("VmHWM") - rss_before
result = {"n_pos": graph.n_pos, "active_features": len(graph.active_features), "graph_cpu": round(graph_cpu, 3), "heads_cpu": round(heads_cpu, 3),
          "heads_added_peak_rss_mb": round(added / 2**20, 1), "rss_before_heads_mb": round(rss_before / 2**20, 1),
          "edges": len(targets), "targets": len(targets.unique()), "sources": len(sources.unique()),
          "rows": len(loadings), "chunks": str(chunks)}
if profiled:
    profile = cProfile.Profile()
    profile.enable()
    head_loadings(lrm, graph, targets, sources, config, memory_budget=budget)
    profile.disable()
    result["profiled_cumulative_s_and_calls"] = {
        name: [round(stats[3], 2), stats[1]] for (path, _, name), stats in pstats.Stats(profile).stats.items()
        if path.endswith("heads.py") and name in {names}}
print(json.dumps(result))
""".replace("{names}", repr(set(FUNCTIONS)))


def code_root(before: str, work: Path) -> str:
    """A directory holding the code `before` names: itself if it is one, else that git revision extracted."""
    if Path(before).is_dir():
        return str(Path(before).resolve())
    out = work / f"code_{before}"
    out.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", before], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return str(out)


def git_head() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def run_side(code: str, count: int, budget_mib: int, profiled: bool, job: dict, timeout: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", WORKER, code, str(ROOT), str(count), str(budget_mib),
                               "1" if profiled else "0", PROMPT, json.dumps(job)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s (graph and head loadings together)"}
    if proc.returncode:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repeats", help="comma-separated repeats of the prompt sentence (tiny), or prompt lengths "
                        "in tokens (--model smollm2-135m)")
    parser.add_argument("budget_mib", type=int, help="head-loading memory budget (MiB)")
    parser.add_argument("--before", default="none", help="a git revision or checkout to run beside this one "
                        "('none': this checkout only)")
    parser.add_argument("--profile", action="store_true", help="add a profiled split for this checkout")
    parser.add_argument("--model", default="tiny", help="'tiny' (tests.test_attribution.TINY) or a model name")
    parser.add_argument("--features", type=int, default=512, help="calibrated random CLT: features per layer")
    parser.add_argument("--density", type=float, default=0.04, help="calibrated random CLT: share firing")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per side and length (then killed)")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "attribution_heads_scaling_tiny.json"))
    args = parser.parse_args()
    tiny = args.model == "tiny"
    job = {"model": args.model, "features": args.features, "density": args.density,
           "max_feature_nodes": 64 if tiny else 1024}
    report = {"command": " ".join(["nice", "-n", str(os.nice(0)), "python", *sys.argv]),
              "machine": "AMD EPYC 2-core AVX2, fp32", "load_average_before": os.getloadavg(),
              "model": "tiny (tests.test_attribution.TINY)" if tiny else args.model,
              "clt": "tests.test_attribution.random_clt, seed 0" if tiny else
              f"random, calibrated on each prompt (calibrated_clt, seed 0): {args.features} features per layer, "
              f"{args.density:g} firing, {args.features * args.density:g} active per token per layer",
              "max_feature_nodes": job["max_feature_nodes"], "head_budget_mib": args.budget_mib,
              "timeout_s": args.timeout, "after": f"{ROOT} at {git_head()}", "before": args.before, "lengths": []}
    with tempfile.TemporaryDirectory() as work:
        sides = [("after", str(ROOT))]
        if args.before != "none":
            sides.insert(0, ("before", code_root(args.before, Path(work))))
        for count in [int(r) for r in args.repeats.split(",")]:
            entry = {"repeats" if tiny else "n_tokens_asked": count}
            for side, code in sides:
                entry[side] = run_side(code, count, args.budget_mib, args.profile and side == "after", job,
                                       args.timeout)
                entry[side]["load_average"] = os.getloadavg()[0]
            if "before" in entry and "heads_cpu" in entry["before"] and "heads_cpu" in entry["after"]:
                entry["heads_speedup_cpu"] = round(entry["before"]["heads_cpu"] / entry["after"]["heads_cpu"], 2)
            report["lengths"].append(entry)
            print(json.dumps(entry), flush=True)
            Path(args.output).write_text(json.dumps(report, indent=2))
    report["load_average_after"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
