"""Tables from a store, printed (`query`), and stored graphs as circuit-tracer frontend JSON (`export`, with
the tokenizer of the model each graph records, so that model must still load).

    sparse-interp query graphs STORE              one row per graph: id, variant, task, sizes, scores, prompt
    sparse-interp query edges STORE GRAPH_ID      the top edges (by |weight|) of one graph, with node ids
    sparse-interp query head STORE L5H3           the graphs where head 3 of layer 5 carries part of an edge
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc

from attribution.frontend import FrontendExportError, export_frontend
from attribution.store import GraphStore, StoreError, check_id, open_store
from cli.errors import UsageError, one_line
from sparse_attention.config import ModelSpec
from sparse_attention.sources import load_source

GRAPH_COLUMNS = ["graph_id", "variant", "task", "prompt_index", "n_pos", "n_nodes_kept", "n_edges_kept",
                 "replacement_score", "completeness_score", "prompt"]
EDGE_COLUMNS = ["source_id", "target_id", "weight", "kept"]
HEAD = re.compile(r"^L(\d+)H(\d+)$", re.IGNORECASE)


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    tables = parser.add_subparsers(dest="table", required=True, metavar="TABLE")
    graphs = tables.add_parser("graphs", help="one row per committed graph")
    _common(graphs)
    graphs.set_defaults(handler=query_graphs)
    edges = tables.add_parser("edges", help="the top edges of one graph")
    _common(edges)
    edges.add_argument("graph_id", help="the graph's id (see `query graphs`)")
    edges.add_argument("--top", type=int, default=20, metavar="K", help="how many edges (default %(default)s)")
    edges.add_argument("--all", action="store_true", help="among every stored edge, not only those pruning kept")
    edges.set_defaults(handler=query_edges)
    head = tables.add_parser("head", help="the graphs where one attention head carries part of an edge")
    _common(head)
    head.add_argument("head", help="the head as L{layer}H{head}, e.g. L5H3")
    head.set_defaults(handler=query_head)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store directory or pyarrow filesystem URI")
    parser.add_argument("--variant", help="only graphs of this variant (default: all)")
    parser.add_argument("--format", choices=("table", "csv", "jsonl"), default="table",
                        help="output format (default %(default)s)")
    parser.add_argument("--traceback", action="store_true", help="print the traceback of an error, too")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store directory or pyarrow filesystem URI")
    parser.add_argument("graph_ids", nargs="*", metavar="GRAPH_ID", help="graphs to export (see `query graphs`)")
    parser.add_argument("--all", action="store_true", help="export every graph of the store (or of --variant)")
    parser.add_argument("--variant", help="with --all: only graphs of this variant")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="output directory: {slug}.json per graph and graph-metadata.json")
    parser.add_argument("--slug", help="the graph's name in the frontend (one graph only; default its graph id)")
    add_frontend_options(parser)
    parser.add_argument("--traceback", action="store_true", help="print the traceback of an error, too")


def add_frontend_options(parser: argparse.ArgumentParser) -> None:
    """The options of attribution.frontend.export_frontend that shape the files (shared with `attribute`)."""
    parser.add_argument("--scan", help="the feature panels' scan name (default: the CLT directory's name)")
    parser.add_argument("--unique-error-ids", action="store_true", help="name error nodes {layer}_-1_{pos}; "
                        "needed when circuit-tracer's error ids 0_{layer}_{pos} collide with layer-0 features")


def existing_store(uri: str) -> GraphStore:
    """The store at `uri`; a local path must be an existing directory."""
    if "://" not in uri and not Path(uri).expanduser().is_dir():
        raise UsageError(f"store {uri} is not a directory")
    return open_store(uri)


def _graph_id(graph_id: str) -> str:
    try:
        return check_id(graph_id)
    except StoreError as error:
        raise UsageError(str(error)) from None


def _variant(store: GraphStore, variant: str | None) -> str | None:
    if variant is not None and variant not in store.variants():
        raise UsageError(f"--variant {variant!r} is not in the store; its variants: {store.variants()}")
    return variant


def _print(frame: pd.DataFrame, form: str) -> None:
    if form == "csv":
        frame.to_csv(sys.stdout, index=False)
    elif form == "jsonl":
        if len(frame):
            print(frame.to_json(orient="records", lines=True, date_format="iso").rstrip("\n"))
    else:
        print(frame.to_string(index=False, max_colwidth=60) if len(frame) else "(no rows)")


def query_graphs(args: argparse.Namespace) -> int:
    store = existing_store(args.store)
    graphs = store.list_graphs(_variant(store, args.variant))
    _print(graphs[GRAPH_COLUMNS], args.format)
    return 0


def query_edges(args: argparse.Namespace) -> int:
    if args.top <= 0:
        raise UsageError(f"--top {args.top} must be a positive count")
    store = existing_store(args.store)
    edges = store.top_edges(_graph_id(args.graph_id), args.top, kept_only=not args.all)
    _print(edges[EDGE_COLUMNS], args.format)
    return 0


def query_head(args: argparse.Namespace) -> int:
    match = HEAD.match(args.head)
    if not match:
        raise UsageError(f"head {args.head!r} must look like L5H3 (layer 5, head 3)")
    layer, head = int(match[1]), int(match[2])
    store = existing_store(args.store)
    variant = _variant(store, args.variant)
    graphs = store.list_graphs(variant)
    if len(graphs) and layer >= graphs["n_layers"].max():
        raise UsageError(f"head {args.head}: layer {layer} is past the last layer ({graphs['n_layers'].max() - 1})")
    loadings = store.dataset("head_loadings", variant).to_table(
        columns=["graph_id", "target", "source", "weight"],
        filter=(pc.field("layer") == layer) & (pc.field("head") == head)).to_pandas()
    loadings["abs_weight"] = loadings["weight"].abs()
    carried = (loadings.groupby("graph_id").agg(edges=("weight", "size"), abs_weight=("abs_weight", "sum"))
               .reset_index())
    table = carried.merge(graphs[["graph_id", "variant", "task", "prompt_index", "prompt"]], on="graph_id")
    table = table.sort_values(["abs_weight", "graph_id"], ascending=[False, True], kind="stable")
    _print(table[["graph_id", "variant", "edges", "abs_weight", "task", "prompt_index", "prompt"]], args.format)
    return 0


def export(args: argparse.Namespace) -> int:
    store = existing_store(args.store)
    if args.all == bool(args.graph_ids):
        raise UsageError("give graph ids or --all (not both)" if args.all else "give graph ids or --all")
    if args.variant is not None and not args.all:
        raise UsageError(f"--variant {args.variant!r} selects graphs for --all; give --all too")
    graph_ids = (list(store.list_graphs(_variant(store, args.variant))["graph_id"]) if args.all
                 else [_graph_id(g) for g in args.graph_ids])
    if args.slug is not None and len(graph_ids) != 1:
        raise UsageError(f"--slug {args.slug!r} names one graph, but {len(graph_ids)} were given")
    tokenizers: dict[str, object] = {}  # model identity -> its tokenizer, loaded once
    for graph_id in graph_ids:
        model = store.graph_info(graph_id)["model"]
        if model not in tokenizers:
            tokenizers[model] = tokenizer_of(model, graph_id)
        print(write_frontend(store, graph_id, args.out, args.slug, args.scan, tokenizers[model],
                             args.unique_error_ids))
    return 0


def write_frontend(store: GraphStore, graph_id: str, out: Path, slug: str | None, scan: str | None, tokenizer,
                   unique_error_ids: bool) -> Path:
    """export_frontend, its refusals (an error id that collides, a bad scan name) as usage errors."""
    try:
        return export_frontend(store, graph_id, out, slug, scan, tokenizer, unique_error_ids)
    except FrontendExportError as error:
        raise UsageError(f"cannot export graph {graph_id}: {one_line(error)} (options --unique-error-ids, "
                         "--scan)") from None


def tokenizer_of(model: str, graph_id: str):
    """The tokenizer of the model a graph records (its graphs row's `model` identity JSON)."""
    identity = json.loads(model)
    if identity.get("kind") == "gated":
        source = Path(identity["checkpoint"])
    else:
        source = ModelSpec(**{k: v for k, v in identity.items() if k in ModelSpec.model_fields})
    try:
        return load_source(source)[1]
    except Exception as error:  # noqa: BLE001 - any failure to load means the same thing here
        raise RuntimeError(f"cannot load the model of graph {graph_id} ({identity.get('model_name')}) for its "
                           f"tokenizer, which the export needs: {error}") from None
