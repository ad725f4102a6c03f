"""Head-loading time against prompt length on the tiny model (fixed node cap: 64 features), split by
function (cProfile cumulative seconds and calls; profiling inflates them, read them as shares), beside the
graph's time: a cheap check of how each phase scales with positions.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/attribution_heads_scaling.py 4,8,16,32 64

Arguments: repeats of "The cat sat on the mat. " (97, 193, 385, 769 tokens with the tiny tokenizer), and the
head-loading memory budget in MiB. Writes bench/results/attribution_heads_scaling_tiny.json.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attribution.config import AttentionAttributionConfig, GraphConfig  # noqa: E402
from attribution.graph import attribute  # noqa: E402
from attribution.heads import LoadingShape, head_loadings, plan_head_chunks  # noqa: E402
from attribution.nodes import build_replacement, transcoder_weights  # noqa: E402
from attribution.prune import prune  # noqa: E402
from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt  # noqa: E402
from attribution.stage import kept_edges  # noqa: E402
from sparse_attention.models import tiny_model  # noqa: E402
from tests.test_attribution import N_FEATURES, TINY, random_clt  # noqa: E402

FUNCTIONS = ("head_side_gradients", "head_outputs", "_head_parts", "_main_pairs", "_layer_rows", "_block_loadings",
             "add_mlp_writes")


def main() -> None:
    torch.set_num_threads(1)
    repeats, budget_mib = [int(r) for r in sys.argv[1].split(",")], int(sys.argv[2])
    model, tokenizer = tiny_model(TINY)
    weights = extract_weights(model)
    clt = transcoder_weights(random_clt(TINY.n_layers, TINY.d_model, N_FEATURES, seed=0), weights)
    budget = budget_mib * 2**20
    report = {"command": " ".join(["nice", "-n", str(os.nice(0)), "python", *sys.argv]),
              "load_average_before": os.getloadavg(), "model": "tiny (tests.test_attribution.TINY)",
              "clt": "tests.test_attribution.random_clt, seed 0", "max_feature_nodes": 64,
              "head_budget_mib": budget_mib, "lengths": []}
    for count in repeats:
        tokens = tokenize_prompt(tokenizer, "The cat sat on the mat. " * count)
        lrm = build_replacement(weights, clt, freeze_prompt(model, tokens))
        started = time.process_time()
        graph = attribute(lrm, GraphConfig(max_feature_nodes=64))
        graph_cpu = time.process_time() - started
        pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos, row_nodes=graph.row_nodes)
        targets, sources = kept_edges(graph, pruned)
        shape = LoadingShape(graph.n_pos, weights.d_model, lrm.n_layers, weights.n_heads)
        chunks = plan_head_chunks(shape, len(targets.unique()), len(sources.unique()), budget)
        profile = cProfile.Profile()
        started = time.process_time()
        profile.enable()
        head_loadings(lrm, graph, targets, sources, AttentionAttributionConfig(), memory_budget=budget)
        profile.disable()
        heads_cpu = time.process_time() - started
        split = {name: [round(stats[3], 2), stats[1]] for (path, _, name), stats in pstats.Stats(profile).stats.items()
                 if path.endswith("heads.py") and name in FUNCTIONS}
        report["lengths"].append({"n_pos": graph.n_pos, "graph_cpu": round(graph_cpu, 2), "heads_cpu": round(heads_cpu, 2),
                                  "edges": len(targets), "targets": len(targets.unique()),
                                  "sources": len(sources.unique()), "chunks": str(chunks),
                                  "cumulative_s_and_calls": split})
        print(json.dumps(report["lengths"][-1]), flush=True)
    report["load_average_after"] = os.getloadavg()
    (ROOT / "bench" / "results" / "attribution_heads_scaling_tiny.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
