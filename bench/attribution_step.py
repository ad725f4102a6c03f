"""The per-prompt attribution step as a whole: graph vs head loadings vs QK attribution vs write, before
and after a change, and peak memory against prompt length.

    .venv/bin/python bench/attribution_step.py                      # this checkout vs the commit before (BEFORE)
    .venv/bin/python bench/attribution_step.py --before /path/to/checkout --lengths 64,128,256,512,1024

SmolLM2-135M (dense) with a random CLT calibrated as bench/attribution_vs_circuit_tracer.py does (30
layers x 256 features, 2% of features active; its decoder also scaled x10, so that pruning keeps more
feature targets, as a trained CLT's graph does), max_feature_nodes 1024, the stage's default settings
otherwise, 1 thread. Every run is a fresh process that loads the model and CLT, attributes the prompt
once to warm up and then `--repeats` times through the stage's own per-prompt step
(`Attributor.attribute`, forced, into a scratch store), timing its phases by wrapping the functions the
stage calls: graph = freeze_prompt + build_replacement + attribute + prune; head_loadings; qk_attribution;
write = building the tables and store.write. "before" runs the same worker with another tree first on
sys.path (a git revision extracted with git archive, or a checkout), so both sides run their own code.

Timing: the 21-token IOI prompt (prompts/data/ioi.jsonl line 5), before and after, alternating by round;
CPU seconds (time.process_time) and wall seconds per phase, median over rounds and repeats. Memory: for
each length, a prompt of IOI sentences cut to that many tokens, the new code, one fresh process: peak RSS
(ru_maxrss) and RSS after loading, the phases, and the stage's outcome (a graph, or the failure it
recorded, e.g. MemoryBudgetError); --refusal-lengths run under --refusal-budget-gb, where the stage's
estimates refuse before allocating (computing them would take longer than this benchmark should). The
machine is shared: prefer CPU seconds and ratios; the load average is recorded. Results:
bench/results/attribution_step.json (written after the timing and after every length).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IOI_PROMPT = "Then, Andrew and Kelly were thinking about going to the hospital. Andrew wanted to give a phone to"
PHASES = ("graph", "head_loadings", "qk", "write")
BEFORE = "b93ccc5"  # the last commit before head loadings and QK attribution were chunked and batched
GRAPH_FUNCTIONS = ("freeze_prompt", "build_replacement", "attribute", "prune")


# ---------------------------------------------------------------------------------------------- worker
def worker(job: dict) -> None:
    """One fresh process on `job["code_root"]`'s attribution code: attribute prompts through the stage's
    per-prompt step, timing its phases."""
    sys.path.insert(0, job["code_root"])
    import torch

    torch.set_num_threads(1)
    from attribution import stage
    from attribution.config import AttributionStageConfig, GraphConfig
    from attribution.stage import Attributor, PromptItem
    from attribution.store import open_store
    from sparse_attention.config import ModelSpec

    started = time.perf_counter()
    variant = job.get("variant", "dense")  # a gated checkpoint directory in job["model_dir"], if given
    attributor = Attributor.load(job.get("model_dir") or ModelSpec(name=job["model"]), job["clt_dir"], variant)
    load_seconds = time.perf_counter() - started
    rss_after_load_mb = rss_mb()
    spent: dict[str, list[float]] = {}
    peak_after: dict[str, float] = {}  # peak RSS (MB) of the process when each timed function returned

    def timed(name, function):
        def wrapper(*args, **kwargs):
            cpu, wall = time.process_time(), time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                total = spent.setdefault(name, [0.0, 0.0])
                total[0] += time.process_time() - cpu
                total[1] += time.perf_counter() - wall
                peak_after[name] = rss_mb(peak=True)
        return wrapper

    for name in (*GRAPH_FUNCTIONS, "head_loadings", "qk_attribution"):
        setattr(stage, name, timed(name, getattr(stage, name)))
    graphs = []
    compute_graph = stage.attribute
    stage.attribute = lambda *args, **kwargs: graphs.append(compute_graph(*args, **kwargs)) or graphs[-1]
    attributor.record = timed("record", attributor.record)
    store = open_store(Path(job["out_dir"]) / "store")
    store.write = timed("store_write", store.write)
    settings = {"graph": GraphConfig(max_feature_nodes=job["max_feature_nodes"])}
    if job.get("memory_budget_gb"):
        settings["memory_budget_gb"] = job["memory_budget_gb"]
    if job.get("attention") is False:  # the graph alone (bench/attribution_memory.py --no-attention)
        settings["attention"] = {"enabled": False}
    config = AttributionStageConfig(prompts=[job["prompt"]], **settings)

    def step() -> dict:
        spent.clear()
        cpu, wall = time.process_time(), time.perf_counter()
        outcome = attributor.attribute(PromptItem(job["prompt"]), config, store, force=True)
        total = [time.process_time() - cpu, time.perf_counter() - wall]
        phases = {}
        for clock, kind in enumerate(("cpu", "wall")):
            graph = sum(spent.get(name, [0.0, 0.0])[clock] for name in GRAPH_FUNCTIONS)
            heads = spent.get("head_loadings", [0.0, 0.0])[clock]
            qk = spent.get("qk_attribution", [0.0, 0.0])[clock]
            phases[kind] = {"graph": graph, "head_loadings": heads, "qk": qk,
                            "write": total[clock] - graph - heads - qk, "step": total[clock]}
        return {"phases": phases, "peak_rss_mb_after": dict(peak_after),
                "outcome": {k: v for k, v in outcome.items() if k not in ("worker",)}}

    runs = [step() for _ in range(job["repeats"] + 1)][1:] if job["repeats"] else [step()]
    result = {"load_seconds": load_seconds, "rss_after_load_mb": rss_after_load_mb, "runs": runs,
              "peak_rss_mb": rss_mb(peak=True)}
    outcome = runs[-1]["outcome"]
    if outcome["status"] == "graph":
        graph_id = outcome["graph_id"]
        result["stored_bytes"] = {table: (Path(job["out_dir"]) / "store" / table / f"variant={variant}" /
                                          f"{graph_id}.parquet").stat().st_size
                                  for table in ("graphs", "nodes", "edges", "head_loadings", "qk_pairs")}
        result["circuit_tracer_pt_bytes"] = circuit_tracer_pt_bytes(graphs[-1])
        tables = store.load_graph(graph_id)
        result["rows"] = {name: len(getattr(tables, name)) for name in ("nodes", "edges", "head_loadings", "qk_pairs")}
    Path(job["out_dir"], "result.json").write_text(json.dumps(result, indent=2))


def circuit_tracer_pt_bytes(graph) -> int:
    """Bytes of circuit-tracer 0.5.0's `Graph.to_pt` for this graph: torch.save of the dict it saves, with
    its tensors' dtypes and shapes (dense [N, N] float32 adjacency, int64 indices), less its `cfg` (the
    model's config object, a few KB)."""
    import io

    import torch

    saved = {"input_string": graph.prompt, "adjacency_matrix": graph.adjacency.float().contiguous(), "cfg": None,
             "active_features": graph.active_features.long(), "logit_targets": graph.logit_tokens.long(),
             "logit_probabilities": graph.logit_probs.float(), "vocab_size": 0, "input_tokens": graph.tokens.long(),
             "selected_features": graph.selected.long(), "activation_values": graph.activations.float(), "scan": None}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    return buffer.tell()


def rss_mb(peak: bool = False) -> float:
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------- driver
def run_worker(job: dict, work: Path, timeout: int) -> dict:
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": job["code_root"]}
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", str(out / "job.json")], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=work)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "process_seconds": time.perf_counter() - started}
    if proc.returncode:
        return {"error": proc.stderr[-3000:], "process_seconds": time.perf_counter() - started}
    return {**json.loads((out / "result.json").read_text()), "process_seconds": time.perf_counter() - started}


def code_root(before: str, work: Path) -> str:
    """A directory holding the code `before` names: itself if it is one, else that git revision extracted."""
    if Path(before).is_dir():
        return str(Path(before).resolve())
    out = work / f"code_{before}"
    if not out.exists():
        out.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", before], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return str(out)


def prompt_of_length(tokenizer, n_tokens: int) -> str:
    """IOI sentences (prompts/data/ioi.jsonl) cut to `n_tokens` tokens with the BOS (the count of the
    text's own tokenisation is reported by the run)."""
    lines = (ROOT / "prompts" / "data" / "ioi.jsonl").read_text().splitlines()
    text = " ".join(json.loads(line)["clean"] for line in lines if line.strip())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens - 1]
    return tokenizer.decode(ids)


def pruned_graph_of_length(attributor, n_tokens: int, max_feature_nodes: int = 1024):
    """One graph of an IOI prompt of `n_tokens` tokens with the stage's settings (but `max_feature_nodes`),
    pruned as the stage prunes it: (config, frozen prompt, replacement model, graph, pruning, CPU s of attributing
    and pruning)."""
    from attribution.config import AttributionStageConfig, GraphConfig
    from attribution.graph import attribute
    from attribution.nodes import build_replacement
    from attribution.prune import prune
    from attribution.replacement import freeze_prompt, tokenize_prompt

    prompt = prompt_of_length(attributor.tokenizer, n_tokens)
    config = AttributionStageConfig(prompts=[prompt], graph=GraphConfig(max_feature_nodes=max_feature_nodes))
    frozen = freeze_prompt(attributor.model, tokenize_prompt(attributor.tokenizer, prompt))
    lrm = build_replacement(attributor.weights, attributor.clt, frozen, config.graph.max_n_logits,
                            config.graph.desired_logit_prob)
    started = time.process_time()
    graph = attribute(lrm, config.graph, prompt=prompt)
    pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos, config.graph.node_threshold,
                   config.graph.edge_threshold, row_nodes=graph.row_nodes)
    return config, frozen, lrm, graph, pruned, time.process_time() - started


def git_head() -> str:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def summary(runs: list[dict]) -> dict:
    """Median over runs of each phase's CPU and wall seconds, and the step's ratio to the graph."""
    out = {}
    for kind in ("cpu", "wall"):
        median = {phase: statistics.median(r["phases"][kind][phase] for r in runs) for phase in (*PHASES, "step")}
        out[kind] = {**median, "step_over_graph": median["step"] / median["graph"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--before", default=BEFORE, help="the code 'before': a git revision of this repository "
                        "(extracted into --work) or a checkout directory; 'none': time this checkout only")
    parser.add_argument("--features", type=int, default=256, help="random CLT: features per layer")
    parser.add_argument("--density", type=float, default=0.02, help="random CLT: share of features active")
    parser.add_argument("--decoder-scales", default="1,10", help="random CLT: decoder weights times these, one "
                        "timing case each (x10: features carry more of the graph, pruning keeps more targets); the "
                        "first is used for memory")
    parser.add_argument("--max-feature-nodes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="before/after pairs of processes")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per process (after one warm-up)")
    parser.add_argument("--lengths", default="64,128,256", help="prompt lengths (tokens) attributed for memory")
    parser.add_argument("--memory-budget-gb", type=float, help="the stage's memory_budget_gb (default: derived)")
    parser.add_argument("--refusal-lengths", default="512,1024", help="longer prompts, under --refusal-budget-gb: "
                        "what the stage's estimates say before allocating (a refusal, or a graph)")
    parser.add_argument("--refusal-budget-gb", type=float, default=8.0, help="the issue's goal: 1,024 tokens in 8 GB")
    parser.add_argument("--work", default="/tmp/attribution-step-bench")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per worker process")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "attribution_step.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from attribution_vs_circuit_tracer import calibrated_clt

    from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt
    from sparse_attention.models import load_model
    from transcoders.clt import save_clt

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    tokens = tokenize_prompt(tokenizer, IOI_PROMPT)
    weights = extract_weights(model)
    frozen = freeze_prompt(model, tokens)
    clt_dirs = {}
    for scale in [float(s) for s in args.decoder_scales.split(",")]:
        clt = calibrated_clt(weights, frozen, args.features, args.density, seed=0)
        with torch.no_grad():
            for decoder in clt.W_dec:
                decoder.mul_(scale)
        clt_dirs[scale] = work / f"clt_decoder_x{scale:g}"
        save_clt(clt, clt_dirs[scale])
    common = {"model": args.model, "max_feature_nodes": args.max_feature_nodes, "memory_budget_gb": args.memory_budget_gb}
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "threads": 1, "torch": torch.__version__,
                    "load_average_before": os.getloadavg()},
        "settings": {"model": args.model, "prompt": IOI_PROMPT, "n_tokens": len(tokens), "clt_features": args.features,
                     "clt_density": args.density, "max_feature_nodes": args.max_feature_nodes,
                     "before": args.before, "after": f"{ROOT} at {git_head()}", "rounds": args.rounds,
                     "repeats": args.repeats,
                     "memory_budget_gb": args.memory_budget_gb},
        "timing": {},
    }
    for scale, clt_dir in clt_dirs.items():
        case = report["timing"][f"decoder_x{scale:g}"] = {"clt_dir": str(clt_dir), "before": [], "after": []}
        for round_index in range(args.rounds):
            sides = [("after", str(ROOT))]
            if args.before != "none":
                sides.insert(0, ("before", code_root(args.before, work)))
            for side, root in sides:
                job = {**common, "clt_dir": str(clt_dir), "code_root": root, "prompt": IOI_PROMPT,
                       "repeats": args.repeats, "out_dir": str(work / f"x{scale:g}_{side}_{round_index}")}
                result = run_worker(job, work, args.timeout)
                result["load_average"] = os.getloadavg()
                case[side].append(result)
                last = result["runs"][-1]["phases"]["cpu"] if "runs" in result else result
                print(f"[timing x{scale:g} {side} {round_index}] cpu {json.dumps(last)[:300]}", flush=True)
        for side in ("before", "after"):
            runs = [run for result in case[side] for run in result.get("runs", [])]
            case[f"{side}_summary"] = summary(runs) if runs else None
        if case["before_summary"] and case["after_summary"]:
            case["speedup_cpu"] = {phase: case["before_summary"]["cpu"][phase] / case["after_summary"]["cpu"][phase]
                                   for phase in ("head_loadings", "qk", "write", "step")}
        for side in ("before", "after"):
            last = case[side][-1] if case[side] else {}
            if last.get("stored_bytes"):
                case[f"{side}_bytes"] = {"stored": last["stored_bytes"], "stored_total": sum(last["stored_bytes"].values()),
                                         "rows": last.get("rows"), "circuit_tracer_pt": last.get("circuit_tracer_pt_bytes")}
                if last.get("circuit_tracer_pt_bytes"):
                    case[f"{side}_bytes"]["ours_over_circuit_tracer"] = (case[f"{side}_bytes"]["stored_total"]
                                                                         / last["circuit_tracer_pt_bytes"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    report["memory"] = []
    lengths = [(int(n), args.memory_budget_gb) for n in args.lengths.split(",") if n]
    lengths += [(int(n), args.refusal_budget_gb) for n in args.refusal_lengths.split(",") if n]
    for n_tokens, budget_gb in lengths:
        prompt = prompt_of_length(tokenizer, n_tokens)
        job = {**common, "memory_budget_gb": budget_gb, "clt_dir": str(clt_dirs[next(iter(clt_dirs))]),
               "code_root": str(ROOT), "prompt": prompt, "repeats": 0, "out_dir": str(work / f"memory_{n_tokens}")}
        result = run_worker(job, work, args.timeout)
        entry = {"n_tokens_asked": n_tokens, "n_tokens": len(tokenize_prompt(tokenizer, prompt)),
                 "memory_budget_gb": budget_gb, "load_average": os.getloadavg(), **result}
        report["memory"].append(entry)
        outcome = result.get("runs", [{}])[-1].get("outcome", {})
        print(f"[memory {n_tokens}] peak {result.get('peak_rss_mb')} MB, status {outcome.get('status')} "
              f"{outcome.get('error', result.get('error', ''))[:200]}", flush=True)
        args.output.write_text(json.dumps(report, indent=2))
    report["machine"]["load_average_after"] = os.getloadavg()
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({name: {k: case.get(k) for k in ("before_summary", "after_summary", "speedup_cpu", "before_bytes",
                                                      "after_bytes")}
                      for name, case in report["timing"].items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
