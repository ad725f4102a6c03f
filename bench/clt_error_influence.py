"""Where a graph's influence goes, per CLT: the share of node influence on the logits held by feature, error and
token nodes (each graph's `influence` column over those kinds, mean over graphs), error nodes' share per layer, and
the CLT's held-out nMSE and L0 per layer beside them: what a replacement score is made of.

    python bench/clt_error_influence.py --tag demo skip=runs/s13/graphs_demo_skip:runs/s13/clt_demo_dense \\
        noskip=runs/s13/graphs_demo_noskip:runs/s13/clt_demo_dense_noskip

Each argument is NAME=STORE:CLT_DIR (the store holds one CLT's dense graphs). Writes
bench/results/clt_error_influence_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, not the repository root
    sys.path.insert(0, str(ROOT))

from attribution.store import open_store  # noqa: E402

KINDS = ["feature", "error", "token"]


def influence_shares(store: Path, variant: str = "dense") -> dict:
    """Mean over the store's graphs of each node kind's share of influence, and of error nodes' share per layer."""
    opened = open_store(store)
    graphs = opened.list_graphs(variant)
    if graphs.empty:
        sys.exit(f"no {variant} graphs in {store}")
    kinds, error_layers = [], []
    for graph_id in graphs.graph_id:
        nodes = opened.read_table("nodes", graph_id, columns=["kind", "layer", "influence"])
        nodes = nodes[nodes.kind.isin(KINDS)]
        total = nodes.influence.sum()
        kinds.append(nodes.groupby("kind").influence.sum() / total)
        error_layers.append(nodes[nodes.kind == "error"].groupby("layer").influence.sum() / total)
    return {"n_graphs": len(graphs),
            "share_by_kind": pd.concat(kinds, axis=1).mean(axis=1).to_dict(),
            "error_share_by_layer": [float(v) for v in pd.concat(error_layers, axis=1).mean(axis=1).sort_index()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="NAME=STORE:CLT_DIR")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    result: dict = {"command": "python " + " ".join(sys.argv), "runs": {}}
    for run in args.runs:
        name, _, paths = run.partition("=")
        store, _, clt_dir = paths.partition(":")
        if not (name and store and clt_dir):
            parser.error(f"{run!r} is not NAME=STORE:CLT_DIR")
        metrics = json.loads((Path(clt_dir) / "metrics.json").read_text())
        result["runs"][name] = {"store": store, "clt": clt_dir, **influence_shares(Path(store)),
                                "nmse_per_layer": metrics["nmse_per_layer"], "l0_per_layer": metrics["l0_per_layer"]}
    path = ROOT / "bench" / "results" / f"clt_error_influence_{args.tag}.json"
    path.write_text(json.dumps(result, indent=1))
    for name, entry in result["runs"].items():
        print(name, {k: round(v, 3) for k, v in entry["share_by_kind"].items()})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
