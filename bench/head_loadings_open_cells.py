"""Head loadings with and without forming only the open cells of the main-pair grids (`heads.OpenCells`), on
one graph computed once, in one process: CPU seconds of each, the rows, and how far the two tables differ.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/head_loadings_open_cells.py \\
        --model-dir runs/x/sparsify/model --clt runs/x/clt --lengths 64,128 --tag smollm2_F400

The prompt of n tokens is IOI sentences cut to n tokens (bench/attribution_step.py's `prompt_of_length`), 1,024
feature nodes, the stage's default attention settings, a 2 GiB head-loading budget. "whole grids" sets
OPEN_CELL_COST so high that no window is formed by open cells (the bmm path of every dense model); both sides run
the same graph, whole grids first. Also recorded: the share of causal (query, key) cells open in the prompt's
patterns. Writes bench/results/head_loadings_open_cells_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a gated checkpoint directory (the sparsify stage's model/)")
    parser.add_argument("--clt", required=True, help="a trained CLT directory")
    parser.add_argument("--variant", default="sparse")
    parser.add_argument("--lengths", default="64,128")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()

    import torch
    from attribution_step import git_head, pruned_graph_of_length

    from attribution import heads
    from attribution.stage import Attributor, kept_edges

    torch.set_num_threads(1)
    attributor = Attributor.load(args.model_dir, args.clt, args.variant)
    default_cost = heads.OPEN_CELL_COST
    results = []
    for n_tokens in (int(n) for n in args.lengths.split(",")):
        config, frozen, lrm, graph, pruned, graph_seconds = pruned_graph_of_length(attributor, n_tokens)
        targets, sources, _ = kept_edges(graph, pruned)
        n_pos = graph.n_pos
        frames, seconds = {}, {}
        for side, cost in (("whole grids", 10**9), ("open cells", default_cost)):
            heads.OPEN_CELL_COST = cost
            started = time.process_time()
            frames[side] = heads.head_loadings(lrm, graph, targets, sources, config.attention, memory_budget=2**31)
            seconds[side] = time.process_time() - started
        heads.OPEN_CELL_COST = default_cost
        whole, cells = frames["whole grids"], frames["open cells"]
        pairs = whole["head"] >= 0
        share_gap = (cells["pair_share"] - whole["pair_share"]).abs() / whole["pair_share"].abs()
        results.append({
            "tokens": n_pos, "kept_edges": len(targets), "rows": len(whole), "rows_with_pairs": int(pairs.sum()),
            "open_share_of_causal_cells": float((frozen.patterns != 0).sum()) / (frozen.patterns.shape[0] *
                                                                               frozen.patterns.shape[1] * n_pos * (n_pos + 1) / 2),
            "graph_cpu_seconds": graph_seconds, "head_loadings_cpu_seconds": seconds,
            "ratio_whole_over_cells": seconds["whole grids"] / seconds["open cells"],
            "same_columns_but_share": bool(whole.drop(columns="pair_share").equals(cells.drop(columns="pair_share"))),
            "pair_share_max_relative_gap": float(share_gap[pairs].max()),
            "pair_share_identical_rows": float((cells["pair_share"][pairs] == whole["pair_share"][pairs]).mean()),
        })
        print(json.dumps(results[-1]), flush=True)
        del frames, whole, cells
    result = {"command": "python " + " ".join(sys.argv), "code": git_head(),
              "machine": "AMD EPYC 2-core AVX2, fp32, 1 thread", "load": os.getloadavg(),
              "model_dir": args.model_dir, "clt": args.clt, "lengths": results}
    out = ROOT / "bench" / "results" / f"head_loadings_open_cells_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
