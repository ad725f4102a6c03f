"""Head loadings for every kept edge against only the most influential ones (`attention.edge_influence_share`),
on one graph computed once per prompt, in one process: CPU seconds, edges loaded, rows and Parquet bytes of each,
whether the loaded edges' rows are the whole table's (same rows and main pairs; weights up to
float32 rounding, since the chunks differ), and how many of the attention edges QK
attribution would pick (the `max_attention_edges` largest head parts) stay the same.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/head_loadings_influence_share.py \\
        --model-dir runs/x/sparsify/model --clt runs/x/clt --lengths 64,128 --tag smollm2_F400

Without --model-dir the dense SmolLM2-135M is attributed. The prompt of n tokens is IOI sentences cut to n tokens
(bench/attribution_step.py's `prompt_of_length`), 1,024 feature nodes, the stage's default attention settings, a
2 GiB head-loading budget. Writes bench/results/head_loadings_influence_share_<tag>.json.
"""

from __future__ import annotations

import argparse
import io
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
    parser.add_argument("--model-dir", default=None, help="a gated checkpoint directory (default: dense SmolLM2-135M)")
    parser.add_argument("--clt", required=True, help="a trained CLT directory")
    parser.add_argument("--lengths", default="64,128")
    parser.add_argument("--shares", default="1.0,0.95,0.9,0.8")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()

    import pandas as pd
    import torch
    from attribution_step import git_head, pruned_graph_of_length

    from attribution.heads import edges_to_load, head_loadings
    from attribution.qk import attention_edges
    from attribution.stage import Attributor, kept_edges
    from sparse_attention.config import ModelSpec

    torch.set_num_threads(1)
    variant = "dense" if args.model_dir is None else "sparse"
    attributor = Attributor.load(args.model_dir or ModelSpec(), args.clt, variant)
    shares = [float(s) for s in args.shares.split(",")]
    if shares[0] != 1.0:
        parser.error("--shares must start with 1.0 (every kept edge), the table the others are checked against")
    results = []
    for n_tokens in (int(n) for n in args.lengths.split(",")):
        config, _, lrm, graph, pruned, graph_seconds = pruned_graph_of_length(attributor, n_tokens)
        targets, sources, influence = kept_edges(graph, pruned)
        runs, whole = [], None
        for share in shares:
            started = time.process_time()
            table = head_loadings(lrm, graph, *edges_to_load(graph, targets, sources, influence, share),
                                  config.attention, memory_budget=2**31)
            seconds = time.process_time() - started
            loaded = table[["target", "source"]].drop_duplicates()
            key = pd.MultiIndex.from_arrays([targets.numpy(), sources.numpy()])
            loaded_influence = float(influence[torch.from_numpy(
                key.isin(pd.MultiIndex.from_frame(loaded)))].sum())
            buffer = io.BytesIO()
            table.to_parquet(buffer)
            picked = attention_edges(table, config.attention.max_attention_edges)
            run = {"edge_influence_share": share, "cpu_seconds": seconds, "edges_loaded": len(loaded),
                   "influence_of_loaded_edges": loaded_influence / float(influence.sum()),
                   "rows": len(table), "parquet_bytes": buffer.tell()}
            if whole is None:
                whole, whole_picked = table, picked
            else:
                keys = ["target", "source", "layer", "head"]
                same = whole.merge(loaded).sort_values(keys).reset_index(drop=True)
                mine = table.sort_values(keys).reset_index(drop=True)
                run["rows_same_keys_as_whole_table"] = bool(same[keys + ["query_pos", "key_pos"]].equals(
                    mine[keys + ["query_pos", "key_pos"]]))
                run["weight_max_abs_gap_to_whole_table"] = float((same["weight"] - mine["weight"]).abs().max())
                run["weight_max_abs"] = float(same["weight"].abs().max())
                run["qk_edges_also_picked_from_whole"] = len(picked.merge(whole_picked)) / max(len(picked), 1)
                run["cpu_ratio_whole_over_this"] = runs[0]["cpu_seconds"] / seconds
            runs.append(run)
            print(json.dumps({"tokens": graph.n_pos, **run}), flush=True)
        results.append({"tokens": graph.n_pos, "kept_edges": len(targets), "graph_cpu_seconds": graph_seconds,
                        "runs": runs})
        del whole
    result = {"command": "python " + " ".join(sys.argv), "code": git_head(),
              "machine": "AMD EPYC 2-core AVX2, fp32, 1 thread", "load_after": os.getloadavg(),
              "variant": variant, "model_dir": args.model_dir, "clt": args.clt, "lengths": results}
    out = ROOT / "bench" / "results" / f"head_loadings_influence_share_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
