"""Stored graphs as networkx graphs, and as the JSON the attribution-graphs frontend reads.

The JSON follows circuit-tracer's `create_graph_files` (the format its local server and Neuronpedia
serve): metadata, qParams, nodes (kept by pruning, with cumulative influence) and links (kept edges,
source -> target). One difference: error nodes are `{layer}_-1_{pos}`; circuit-tracer writes
`0_{layer}_{pos}`, which collides with feature `layer` of layer 0.

Feature nodes carry the labels of the CLT's feature dashboards (transcoders/features.py) when the
graph's CLT directory (the `dir` in the graphs row's `clt` JSON) has them: as `clerp` in the frontend
JSON and as the `label` node attribute in networkx.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import pandas as pd

from attribution.store import GraphStore, StoredGraph
from transcoders.features import has_features, open_features

FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit"}


Labels = dict[tuple[int, int], str]  # (layer, feature) -> label


def feature_labels(stored: StoredGraph) -> Labels:
    """The feature labels of the graph's CLT directory, {} when it has no dashboards (or the graph does not
    record a CLT directory); damaged dashboards raise FeaturesError."""
    try:
        clt_dir = json.loads(stored.info["clt"])["dir"]
    except (ValueError, TypeError, KeyError):
        return {}
    return open_features(clt_dir).labels() if has_features(clt_dir) else {}


def to_networkx(stored: StoredGraph, kept_only: bool = True, labels: Labels | None = None) -> nx.DiGraph:
    """A DiGraph keyed by node id with edges source -> target (attribute `weight`); node attributes are
    the nodes table's columns, plus `label` (feature nodes: the dashboard label or None; others None).
    `kept_only`: only the nodes and edges pruning kept. `labels`: None reads them from the graph's CLT dir."""
    labels = feature_labels(stored) if labels is None else labels
    nodes, edges = stored.nodes, stored.edges
    if kept_only:
        nodes, edges = nodes[nodes["kept"]], edges[edges["kept"]]
    graph = nx.DiGraph(graph_id=stored.info["graph_id"], prompt=stored.info["prompt"],
                       variant=stored.info["variant"])
    columns = [c for c in nodes.columns if c not in ("graph_id", "node_id")]
    for row in nodes.itertuples(index=False):
        label = labels.get((int(row.layer), int(row.feature))) if row.kind == "feature" else None
        graph.add_node(row.node_id, **{c: _plain(getattr(row, c)) for c in columns}, label=label)
    ids = stored.nodes.set_index("node_index")["node_id"]
    kept_ids = set(nodes["node_id"])
    for target, source, weight in zip(ids.reindex(edges["target"]), ids.reindex(edges["source"]), edges["weight"]):
        if source in kept_ids and target in kept_ids:
            graph.add_edge(source, target, weight=float(weight))
    return graph


def _plain(value):
    """numpy scalars and NaN/None as plain Python values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node_json(row, n_layers: int, first_logit: int, labels: Labels) -> dict:
    kind, layer, pos, feature = row.kind, int(row.layer), int(row.pos), int(row.feature)
    node = {"node_id": row.node_id, "feature": feature, "layer": str(layer), "ctx_idx": pos,
            "feature_type": FEATURE_TYPES[kind], "token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
            "reverse_ctx_idx": 0, "jsNodeId": row.node_id, "clerp": "",
            "influence": _plain(row.cumulative_influence), "activation": None}
    if kind == "feature":
        node.update(feature=_cantor(layer, feature), jsNodeId=f"{layer}_{feature}-0", activation=_plain(row.activation),
                    clerp=labels.get((layer, feature), ""))
    elif kind == "error":
        node.update(feature=-1, jsNodeId=f"{layer}_{pos}-0")
    elif kind == "token":
        node.update(feature=pos, layer="E", jsNodeId=f"E_{feature}-{pos}")
    else:
        prob = float(row.token_prob)
        node.update(layer=str(n_layers + 1), token_prob=prob, is_target_logit=int(row.node_index) == first_logit,
                    jsNodeId=f"L_{feature}-{pos}", influence=None, clerp="")
    return node


def frontend_graph(stored: StoredGraph, slug: str | None = None, scan: str = "custom",
                   node_threshold: float = 0.8, logit_token_strings: list[str] | None = None,
                   labels: Labels | None = None) -> dict:
    """The frontend JSON of one stored graph (a dict; `json.dumps` it to write). Feature nodes' `clerp` is
    their label (`labels`; None reads them from the graph's CLT dir), "" without one."""
    labels = feature_labels(stored) if labels is None else labels
    info, nodes, edges = stored.info, stored.nodes, stored.edges
    kept_nodes = nodes[nodes["kept"]]
    kept_edges = edges[edges["kept"]]
    first_logit = int(nodes.loc[nodes["kind"] == "logit", "node_index"].min())
    logit_strings = dict(zip(info["logit_tokens"], logit_token_strings or [str(t) for t in info["logit_tokens"]]))
    json_nodes = {}
    for row in kept_nodes.itertuples(index=False):
        node = _node_json(row, int(info["n_layers"]), first_logit, labels)
        if row.kind == "logit":
            node["clerp"] = f'Output "{logit_strings[int(row.feature)]}" (p={node["token_prob"]:.3f})'
        json_nodes[int(row.node_index)] = node
    links = [{"source": json_nodes[s]["node_id"], "target": json_nodes[t]["node_id"], "weight": float(w)}
             for t, s, w in zip(kept_edges["target"], kept_edges["source"], kept_edges["weight"])
             if s in json_nodes and t in json_nodes]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in json_nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug or str(info["graph_id"]), "scan": scan, "transcoder_list": [],
                "prompt_tokens": list(info["token_strings"]), "prompt": info["prompt"],
                "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def export_frontend(store: GraphStore, graph_id: str, out_dir: str | Path, slug: str | None = None,
                    scan: str = "custom", tokenizer=None) -> Path:
    """Write `{slug}.json` and update `graph-metadata.json` in `out_dir`, as circuit-tracer does."""
    stored = store.load_graph(graph_id)
    strings = [tokenizer.decode([int(t)]) for t in stored.info["logit_tokens"]] if tokenizer is not None else None
    settings = json.loads(stored.info["settings"])
    threshold = settings.get("graph", {}).get("node_threshold", 0.8)
    data = frontend_graph(stored, slug, scan, threshold, strings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data['metadata']['slug']}.json"
    path.write_text(json.dumps(data, indent=2))
    index_path = out_dir / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g["slug"] != data["metadata"]["slug"]] + [data["metadata"]]
    index_path.write_text(json.dumps(index, indent=2))
    return path


def nodes_frame(graph: nx.DiGraph) -> pd.DataFrame:
    """The node attributes of a networkx graph as a DataFrame (handy after graph analysis)."""
    return pd.DataFrame.from_dict(dict(graph.nodes(data=True)), orient="index")
