"""The graph store at batch-evaluation scale: a 10,000-graph store before and after compaction.

    python bench/store_scale.py                          # 10,000 graphs, 2 variants
    python bench/store_scale.py --graphs 1000 --output /tmp/store_scale.json

Builds a store of small random graphs (`synthetic_record`: tens of nodes, a few hundred edges, head
loadings and QK pairs, every table's schema exact) through the store's own write path, then times three
queries on a fresh GraphStore each (nothing cached in the process; the OS file cache is warm):
list every graph, the top 100 edges of one graph, and every graph where head L5H3 carries an edge
(`store.dataset("head_loadings")` filtered on layer and head). Each is timed before and after
`compact` (one pack per variant and table), the fastest of --repeats. Goal: each under 1 s after
compaction. Writes bench/results/store_scale.json with the command line and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from attribution.records import GraphRecord  # noqa: E402
from attribution.schema import ROW_COUNTS, SCHEMAS  # noqa: E402
from attribution.store import GraphStore, open_store  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "store_scale.json"
N_LAYERS, N_HEADS = 6, 4  # head L5H3 exists
QK_KINDS = ["pair", "pair_rest", "offset", "query_marginal", "query_marginal_rest", "key_marginal",
            "key_marginal_rest"]


def _table(name: str, columns: dict) -> pa.Table:
    schema = SCHEMAS[name]
    return pa.table([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)


def synthetic_record(graph_id: str, variant: str, seed: int) -> GraphRecord:
    """A small random graph with every table filled (sizes vary with the seed), exact to the store's schema:
    nodes, edges with the kept ones first by |weight|, head loadings over all layers and heads, QK pairs."""
    rng = np.random.default_rng(seed)
    n_pos, n_nodes = int(rng.integers(4, 16)), int(rng.integers(20, 60))
    n_edges = int(rng.integers(50, 300))
    n_kept = int(rng.integers(1, n_edges))
    n_loadings, n_pairs = int(rng.integers(0, 80)), int(rng.integers(0, 60))
    layer = rng.integers(-1, N_LAYERS + 2, n_nodes).astype(np.int32)
    pos = rng.integers(0, n_pos, n_nodes).astype(np.int32)
    feature = rng.integers(-1, 4096, n_nodes).astype(np.int32)
    nodes = _table("nodes", {
        "graph_id": [graph_id] * n_nodes, "node_index": np.arange(n_nodes, dtype=np.int32),
        "node_id": [f"{a}_{b}_{c}" for a, b, c in zip(layer, feature, pos)],
        "kind": rng.choice(["feature", "error", "token", "logit"], n_nodes), "layer": layer, "pos": pos,
        "feature": feature, "activation": rng.random(n_nodes, np.float32), "value": rng.standard_normal(n_nodes, np.float32),
        "constant": rng.standard_normal(n_nodes, np.float32), "token_prob": rng.random(n_nodes, np.float32),
        "influence": rng.random(n_nodes, np.float32), "cumulative_influence": rng.random(n_nodes, np.float32),
        "kept": rng.random(n_nodes) < 0.5,
    })
    weight = rng.standard_normal(n_edges).astype(np.float32)
    kept = np.arange(n_edges) < n_kept
    order = np.concatenate([np.argsort(-np.abs(weight[:n_kept]), kind="stable"),
                            n_kept + np.argsort(-np.abs(weight[n_kept:]), kind="stable")])
    edges = _table("edges", {
        "graph_id": [graph_id] * n_edges, "target": rng.integers(0, n_nodes, n_edges).astype(np.int32),
        "source": rng.integers(0, n_nodes, n_edges).astype(np.int32), "weight": weight[order], "kept": kept,
    })
    loadings = _table("head_loadings", {
        "graph_id": [graph_id] * n_loadings, "target": rng.integers(0, n_nodes, n_loadings).astype(np.int32),
        "source": rng.integers(0, n_nodes, n_loadings).astype(np.int32),
        "layer": rng.integers(0, N_LAYERS, n_loadings).astype(np.int32),
        "head": rng.integers(-2, N_HEADS, n_loadings).astype(np.int32),
        "weight": rng.standard_normal(n_loadings, np.float32),
        "query_pos": rng.integers(0, n_pos, n_loadings).astype(np.int32),
        "key_pos": rng.integers(0, n_pos, n_loadings).astype(np.int32),
        "pair_share": rng.random(n_loadings, np.float32),
    })
    qk = _table("qk_pairs", {
        "graph_id": [graph_id] * n_pairs, "layer": rng.integers(0, N_LAYERS, n_pairs).astype(np.int32),
        "head": rng.integers(0, N_HEADS, n_pairs).astype(np.int32),
        "query_pos": rng.integers(0, n_pos, n_pairs).astype(np.int32),
        "key_pos": rng.integers(0, n_pos, n_pairs).astype(np.int32), "kind": rng.choice(QK_KINDS, n_pairs),
        "query_component": [f"{a}_{b}_{c}" for a, b, c in rng.integers(0, 99, (n_pairs, 3))],
        "key_component": [f"attn_{a}_{b}_{c}" for a, b, c in rng.integers(0, 9, (n_pairs, 3))],
        "value": rng.standard_normal(n_pairs, np.float32), "gate_logit": rng.standard_normal(n_pairs, np.float32),
    })
    tokens = rng.integers(0, 50000, n_pos).astype(np.int32)
    graphs = _table("graphs", {
        "graph_id": [graph_id], "variant": [variant], "prompt": [f"synthetic prompt {seed}"], "task": ["synthetic"],
        "prompt_index": [seed], "tokens": [tokens], "token_strings": [[f"t{t}" for t in tokens]],
        "model": ["synthetic"], "clt": ["synthetic"], "settings": ["{}"], "n_layers": [N_LAYERS], "n_pos": [n_pos],
        "n_active_features": [n_nodes], "n_selected_features": [n_nodes], "n_logits": [1], "n_nodes": [n_nodes],
        "n_edges": [n_edges], "n_nodes_kept": [n_nodes // 2], "n_edges_kept": [n_kept], "edges_stored": ["all"],
        "logit_tokens": [[int(tokens[-1])]], "logit_probs": [[0.5]], "attn_logit_softcap": [None], "final_logit_softcap": [None],
        "replacement_score": [rng.random()],
        "completeness_score": [rng.random()], "pruned_replacement_score": [rng.random()],
        "pruned_completeness_score": [rng.random()], "seconds": [0.0],
        "created": [datetime(2024, 1, 1, tzinfo=timezone.utc)], **{column: [None] for column in ROW_COUNTS.values()},
    })
    return GraphRecord(graph_id, variant, {"graphs": graphs, "nodes": nodes, "edges": edges, "head_loadings": loadings,
                                           "qk_pairs": qk})


def graphs_with_head(store: GraphStore, layer: int, head: int) -> list[str]:
    """Every committed graph where head (layer, head) carries part of an edge."""
    carried = store.dataset("head_loadings").to_table(
        columns=["graph_id"], filter=(pc.field("layer") == layer) & (pc.field("head") == head))
    return sorted(pc.unique(carried["graph_id"]).to_pylist())


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def fastest(repeats: int, run) -> tuple[float, object]:
    """The fastest wall time of `repeats` runs, and the last result."""
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - clock)
    return min(times), result


def queries(root: Path, graph_id: str, repeats: int) -> dict:
    """The three queries, each on a fresh store object."""
    list_s, listed = fastest(repeats, lambda: open_store(root).list_graphs())
    top_s, top = fastest(repeats, lambda: open_store(root).top_edges(graph_id, k=100))
    head_s, carried = fastest(repeats, lambda: graphs_with_head(open_store(root), 5, 3))
    return {"list_graphs_s": list_s, "top_100_edges_s": top_s, "graphs_with_head_L5H3_s": head_s,
            "graphs_listed": len(listed), "top_edges_rows": len(top), "graphs_with_head_L5H3": len(carried),
            "_answers": (sorted(listed["graph_id"]), top, carried)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=int, default=10_000, help="graphs in all, split over the variants")
    parser.add_argument("--variants", nargs="+", default=["dense", "sparse"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per query; the fastest counts")
    parser.add_argument("--work", type=Path, default=None, help="where to build the store (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="store_scale-")) if args.work is None else args.work
    root = work / "store"
    shutil.rmtree(root, ignore_errors=True)
    load_start = os.getloadavg()
    store = open_store(root)
    clock = time.perf_counter()
    ids = []
    for i in range(args.graphs):
        graph_id = f"g{i:07d}"
        store.write(synthetic_record(graph_id, args.variants[i % len(args.variants)], seed=i))
        ids.append(graph_id)
    build_s = time.perf_counter() - clock
    files_before = count_files(root)
    probe = ids[len(ids) // 2]
    before = queries(root, probe, args.repeats)
    clock = time.perf_counter()
    compactions = [open_store(root).compact(v) for v in args.variants]
    compact_s = time.perf_counter() - clock
    after = queries(root, probe, args.repeats)
    same = before.pop("_answers")
    answers = after.pop("_answers")
    assert same[0] == answers[0] == sorted(ids), "compaction changed the graph list"
    assert same[1].equals(answers[1]), "compaction changed the top edges"
    assert same[2] == answers[2], "compaction changed which graphs head L5H3 carries"
    result = {
        "benchmark": "graph store at scale: list graphs, top-100 edges of one graph, graphs where head L5H3 "
                     "carries an edge; before and after compaction",
        "how": " ".join(["python", "bench/store_scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "graphs": args.graphs, "variants": args.variants, "repeats": args.repeats,
        "store_files_before": files_before, "store_files_after": count_files(root),
        "build_seconds": build_s, "compact_seconds": compact_s, "compactions": compactions,
        "before_compaction": before, "after_compaction": after,
        "goal_under_1s_after_compaction": all(after[k] < 1.0 for k in
                                              ("list_graphs_s", "top_100_edges_s", "graphs_with_head_L5H3_s")),
        "machine": {"cpus": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version(),
                    "pyarrow": pa.__version__, "load_average_at_start": load_start,
                    "load_average_at_end": os.getloadavg()},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: result[k] for k in ("build_seconds", "compact_seconds", "before_compaction",
                                             "after_compaction", "goal_under_1s_after_compaction")}, indent=2))
    return result


if __name__ == "__main__":
    main()
