"""How broad the original model's attention is, per head, against how open sparse runs keep each head: for
every head of the dense model, the keys each query needs for 50% and 90% of its softmax mass (as a share of
causal pairs, summed over queries like the edge fraction), on held-out blocks; then, per sparse run given, the
log-log correlation of those with the run's per-head open fraction and its most open heads beside them.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/dense_attention_breadth.py \\
        --runs R2=runs/R2/model P0=runs/P0/model --tag smollm2_R2_P0

A run is a sparsify stage directory holding metrics.json (its `heldout_by_length` per-head edge fractions at
--length on --source). Writes bench/results/dense_attention_breadth_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparse_attention.config import TrainDataConfig  # noqa: E402
from sparse_attention.data import load_token_blocks  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402

MASSES = (0.5, 0.9)


def keys_for_mass(attention: torch.Tensor, mass: float) -> torch.Tensor:
    """Per head and query, the fewest keys whose softmax weights reach `mass`.  [H, T, T] -> [H, T]"""
    cumulative = attention.sort(-1, descending=True).values.cumsum(-1)
    return (cumulative < mass).sum(-1) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--source", default="python-docs")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--runs", nargs="*", default=[], help="NAME=sparsify stage dir (holding metrics.json)")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model, attn_implementation="eager")
    blocks = load_token_blocks(TrainDataConfig(source=args.source), tokenizer, args.length).heldout[:args.blocks]
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    needed = {mass: torch.zeros(n_layers, n_heads, dtype=torch.float64) for mass in MASSES}
    causal = 0
    with torch.no_grad():
        for block in blocks:
            attentions = model(block[None], output_attentions=True).attentions  # n_layers x [1, H, T, T]
            causal += len(block) * (len(block) + 1) / 2
            for layer, attention in enumerate(attentions):
                for mass in MASSES:
                    needed[mass][layer] += keys_for_mass(attention[0].double(), mass).sum(-1)
    breadth = {mass: (needed[mass] / causal).numpy() for mass in MASSES}
    result = {"command": "python " + " ".join(sys.argv), "machine": "AMD EPYC 2-core AVX2, fp32, 1 thread",
              "load_after": os.getloadavg(), "model": args.model, "source": args.source, "length": args.length,
              "blocks": len(blocks),
              "dense_keys_share_for_mass": {str(m): breadth[m].round(5).tolist() for m in MASSES},
              "dense_mean_over_heads": {str(m): float(breadth[m].mean()) for m in MASSES}, "runs": {}}
    for name, stage_dir in (item.split("=", 1) for item in args.runs):
        metrics = json.loads((Path(stage_dir) / "metrics.json").read_text())
        row = next(r for r in metrics["heldout_by_length"]
                   if r["source"] == args.source and r["context_length"] == args.length)
        open_share = np.asarray(row["edge_fraction_per_head"])
        top = np.argsort(-open_share.flatten(), kind="stable")[:10]
        result["runs"][name] = {
            "stage_dir": stage_dir, "mean_open_share": float(open_share.mean()),
            "log_log_correlation": {str(m): float(np.corrcoef(np.log(breadth[m].flatten()),
                                                              np.log(np.clip(open_share.flatten(), 1e-5, None)))[0, 1])
                                    for m in MASSES},
            "most_open_heads": [{"head": f"L{i // n_heads}H{i % n_heads}", "open_share": float(open_share.flat[i]),
                                 **{f"dense_share_for_{m}": float(breadth[m].flat[i]) for m in MASSES}} for i in top]}
        print(name, json.dumps(result["runs"][name]["log_log_correlation"]), flush=True)
    out = ROOT / "bench" / "results" / f"dense_attention_breadth_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
