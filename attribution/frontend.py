"""Stored graphs as networkx graphs, and as the files circuit-tracer's attribution-graph frontend reads.

`export_frontend` writes what circuit-tracer 0.5.0's `create_graph_files` writes (its local server and
Neuronpedia read the same): `{slug}.json` with metadata, qParams, nodes (kept by pruning, with cumulative
influence) and links (kept edges, source -> target), and `graph-metadata.json`. Node ids and fields are
circuit-tracer's (`circuit_tracer/frontend/graph_models.py`):

| node    | node_id                      | jsNodeId               | feature                      |
|---------|------------------------------|------------------------|------------------------------|
| feature | `{layer}_{feature}_{pos}`    | `{layer}_{feature}-0`  | cantor(layer, feature)       |
| error   | `0_{layer}_{pos}`            | `{layer}_{pos}-0`      | -1                           |
| token   | `E_{token}_{pos}`            | `E_{token}-{pos}`      | pos                          |
| logit   | `{n_layers + 1}_{token}_{pos}` | `L_{token}-{pos}`    | token                        |

Error ids collide with feature ids of layer 0: `0_{layer}_{pos}` is also feature `layer` of layer 0 at `pos`,
and circuit-tracer then writes two nodes under one id. Such an export is refused (FrontendExportError) unless
`unique_error_ids=True`, which names every error node `{layer}_-1_{pos}` (the store's id, which no feature
takes); circuit-tracer's frontend uses node ids only as keys, so it shows that file correctly.

Beside circuit-tracer's fields, which its frontend and pydantic models ignore: each link's `heads` (its head
loadings: layer, head, weight, query_pos, key_pos, pair_share) and the graph's `qk_pairs` (per attention
edge, the gate logit split into query/key component pairs).

Feature panels: when the graph's CLT directory has dashboards (transcoders/features.py), each exported
feature gets `features/{scan}/{cantor index}.json` in circuit-tracer's feature format
(`circuit_tracer/frontend/feature_models.py`), and the metadata's scan is `./graph_data/features/{scan}`:
circuit-tracer's frontend reads `{scan}/{index}.json` relative to the page for a scan starting with `./`,
and its server (`serve(data_dir=out_dir)`) maps `/graph_data/` to `out_dir`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pandas as pd

from attribution.store import GraphStore, StoredGraph
from transcoders.features import has_features, open_features

FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "token": "embedding",
                 "logit": "logit"}
FEATURES_SUBDIR = "features"
HISTOGRAM_BINS = 20

Labels = dict[tuple[int, int], str]  # (layer, feature) -> label


class FrontendExportError(ValueError):
    """A graph that cannot be written exactly in circuit-tracer's format; the message says why."""


def feature_labels(stored: StoredGraph) -> Labels:
    """The feature labels of the graph's CLT directory, {} when it has no dashboards (or the graph does not
    record a CLT directory); damaged dashboards raise FeaturesError."""
    clt_dir = _clt_dir(stored)
    return open_features(clt_dir).labels() if clt_dir and has_features(clt_dir) else {}


def _clt_dir(stored: StoredGraph) -> str | None:
    try:
        return json.loads(stored.info["clt"])["dir"]
    except (ValueError, TypeError, KeyError):
        return None


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


def cantor(x: int, y: int) -> int:
    """circuit-tracer's feature index of feature y of layer x (Cantor pairing)."""
    return (x + y) * (x + y + 1) // 2 + y


def _node_json(row, n_layers: int, last_pos: int, first_logit: int, labels: Labels, logit_strings: dict,
               unique_error_ids: bool) -> dict:
    """One node as circuit-tracer's `Node.{feature,error,token,logit}_node` builds it, fields in its order."""
    kind, layer, pos, feature = row.kind, int(row.layer), int(row.pos), int(row.feature)
    node = {"node_id": "", "feature": 0, "layer": str(layer), "ctx_idx": pos, "feature_type": FEATURE_TYPES[kind],
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": "",
            "clerp": "", "influence": _plain(row.cumulative_influence), "activation": None}
    if kind == "feature":
        node.update(node_id=f"{layer}_{feature}_{pos}", feature=cantor(layer, feature), jsNodeId=f"{layer}_{feature}-0",
                    activation=_plain(row.activation), clerp=labels.get((layer, feature), ""))
    elif kind == "error":
        node.update(node_id=f"{layer}_-1_{pos}" if unique_error_ids else f"0_{layer}_{pos}", feature=-1,
                    jsNodeId=f"{layer}_{pos}-0")
    elif kind == "token":
        node.update(node_id=f"E_{feature}_{pos}", feature=pos, layer="E", jsNodeId=f"E_{feature}-{pos}")
    else:
        prob = float(row.token_prob)
        node.update(node_id=f"{n_layers + 1}_{feature}_{last_pos}", feature=feature, layer=str(n_layers + 1),
                    ctx_idx=last_pos, token_prob=prob, is_target_logit=int(row.node_index) == first_logit,
                    jsNodeId=f"L_{feature}-{last_pos}", influence=None,
                    clerp=f'Output "{logit_strings[feature]}" (p={prob:.3f})')
    return node


def _head_loadings_by_edge(stored: StoredGraph) -> dict[tuple[int, int], list[dict]]:
    """(target, source) -> the edge's head loadings as JSON rows."""
    out: dict[tuple[int, int], list[dict]] = {}
    for row in stored.head_loadings.itertuples(index=False):
        out.setdefault((int(row.target), int(row.source)), []).append({
            "layer": int(row.layer), "head": int(row.head), "weight": float(row.weight),
            "query_pos": int(row.query_pos), "key_pos": int(row.key_pos), "pair_share": _plain(row.pair_share)})
    return out


def _qk_pairs_json(stored: StoredGraph) -> list[dict]:
    """Per attention edge (layer, head, query_pos, key_pos): its gate logit and the stored terms of its split."""
    out: dict[tuple[int, int, int, int], dict] = {}
    for row in stored.qk_pairs.itertuples(index=False):
        key = (int(row.layer), int(row.head), int(row.query_pos), int(row.key_pos))
        edge = out.setdefault(key, {"layer": key[0], "head": key[1], "query_pos": key[2], "key_pos": key[3],
                                    "gate_logit": float(row.gate_logit), "terms": []})
        edge["terms"].append({"kind": row.kind, "query_component": row.query_component,
                              "key_component": row.key_component, "value": float(row.value)})
    return list(out.values())


def frontend_graph(stored: StoredGraph, tokenizer, slug: str | None = None, scan: str = "custom",
                   node_threshold: float = 0.8, labels: Labels | None = None, unique_error_ids: bool = False) -> dict:
    """The `{slug}.json` of one stored graph as a dict (`json.dumps` it to write): circuit-tracer's
    `create_graph_files` output plus `heads` on links and `qk_pairs`. `tokenizer` decodes prompt and logit
    tokens as circuit-tracer does; feature `clerp`s are `labels` (None: the CLT dir's dashboards), "" without;
    `unique_error_ids`: see the module docstring."""
    if tokenizer is None:
        raise FrontendExportError("the frontend export needs the model's tokenizer: circuit-tracer writes prompt "
                                  "and logit tokens as the tokenizer decodes them")
    labels = feature_labels(stored) if labels is None else labels
    info, nodes, edges = stored.info, stored.nodes, stored.edges
    kept_nodes = nodes[nodes["kept"]].sort_values("node_index")
    kept_edges = edges[edges["kept"]].sort_values(["target", "source"])  # create_graph_files' (row, column) order
    first_logit = int(nodes.loc[nodes["kind"] == "logit", "node_index"].min())
    logit_strings = {int(t): tokenizer.decode(int(t)) for t in info["logit_tokens"]}
    n_layers, last_pos = int(info["n_layers"]), int(info["n_pos"]) - 1
    json_nodes = {int(row.node_index): _node_json(row, n_layers, last_pos, first_logit, labels, logit_strings,
                                                  unique_error_ids)
                  for row in kept_nodes.itertuples(index=False)}
    heads = _head_loadings_by_edge(stored)
    links = [{"source": json_nodes[s]["node_id"], "target": json_nodes[t]["node_id"], "weight": float(w),
              "heads": heads.get((t, s), [])}
             for t, s, w in zip(kept_edges["target"].tolist(), kept_edges["source"].tolist(), kept_edges["weight"])
             if s in json_nodes and t in json_nodes]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in json_nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")]
    _check_unique_ids(used)
    metadata = {"slug": slug or str(info["graph_id"]), "scan": scan, "transcoder_list": [],
                "prompt_tokens": [tokenizer.decode(int(t)) for t in info["tokens"]], "prompt": info["prompt"],
                "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links,
            "qk_pairs": _qk_pairs_json(stored)}


def _check_unique_ids(nodes: list[dict]) -> None:
    seen: dict[str, dict] = {}
    for node in nodes:
        other = seen.setdefault(node["node_id"], node)
        if other is not node:
            raise FrontendExportError(
                f"circuit-tracer's node id {node['node_id']!r} names both a {other['feature_type']} node and a "
                f"{node['feature_type']} node of this graph (its error ids 0_{{layer}}_{{pos}} collide with layer-0 "
                "features), so its frontend would merge them; export with unique_error_ids=True to name error "
                "nodes {layer}_-1_{pos}")


def feature_json(feature: pd.Series, examples: pd.DataFrame, scan: str) -> dict:
    """One feature's panel in circuit-tracer's feature format, from its dashboard row and contexts.

    Top contexts come first (highest first), then the random ones (lowest to highest). The random contexts
    sit at evenly spaced activation ranks of a uniform sample of the tokens where the feature is active, so
    `quantile_values` (percentiles 1..100, interpolated) and `histogram` (HISTOGRAM_BINS bins over
    [0, max_activation]) are estimated from them; both are empty when there are none."""
    layer, index = int(feature["layer"]), int(feature["feature"])
    act_max = float(feature["max_activation"])
    quantiles = []
    for kind, name in (("top", "Top activations"), ("random", "Random activating contexts, lowest to highest")):
        rows = examples[examples["kind"] == kind].sort_values("rank")
        if len(rows):
            quantiles.append({"quantile_name": name, "examples": [
                {"tokens_acts_list": [float(a) for a in row.activations], "train_token_ind": int(row.window_index),
                 "is_repeated_datapoint": False, "tokens": list(row.token_strings)}
                for row in rows.itertuples(index=False)]})
    sample = np.sort(examples.loc[examples["kind"] == "random", "activation"].to_numpy(dtype=np.float64))
    if len(sample):
        ranks = np.linspace(0.0, 1.0, len(sample))
        quantile_values = np.interp(np.arange(1, 101) / 100, ranks, sample).tolist()
        histogram = np.histogram(sample, bins=HISTOGRAM_BINS, range=(0.0, max(act_max, float(sample[-1]))))[0]
        histogram = histogram.astype(float).tolist()
    else:
        quantile_values, histogram = [], []
    return {"transcoder_id": scan, "index": cantor(layer, index), "examples_quantiles": quantiles,
            "top_logits": list(feature["promoted_tokens"]), "bottom_logits": list(feature["suppressed_tokens"]),
            "act_min": 0.0, "act_max": act_max, "quantile_values": quantile_values, "histogram": histogram,
            "activation_frequency": float(feature["density"]), "layer": layer, "feature": index}


def write_feature_files(clt_dir: str | Path, features: set[tuple[int, int]], directory: Path, scan: str) -> int:
    """Write `{directory}/{cantor index}.json` for each (layer, feature) from the CLT's dashboards; returns
    how many. A feature missing from the dashboards raises FrontendExportError."""
    dashboards = open_features(clt_dir)
    table = dashboards.features().set_index(["layer", "feature"], drop=False)
    missing = sorted(features - set(table.index))
    if missing:
        raise FrontendExportError(f"the dashboards of {clt_dir} have no row for features {missing[:5]} (layer, "
                                  "feature); rebuild them for this CLT")
    directory.mkdir(parents=True, exist_ok=True)
    for layer in sorted({layer for layer, _ in features}):
        examples = dashboards.examples(layer=layer)
        by_feature = dict(tuple(examples.groupby("feature"))) if len(examples) else {}
        for feature in sorted(f for at, f in features if at == layer):
            data = feature_json(table.loc[(layer, feature)], by_feature.get(feature, examples.iloc[:0]), scan)
            (directory / f"{data['index']}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return len(features)


def export_frontend(store: GraphStore, graph_id: str, out_dir: str | Path, slug: str | None = None,
                    scan: str | None = None, tokenizer=None, unique_error_ids: bool = False) -> Path:
    """Write `{slug}.json`, update `graph-metadata.json` in `out_dir` as circuit-tracer's `create_graph_files`
    does, and, when the graph's CLT has dashboards, the exported features' panels under
    `features/{scan}/` (the metadata's scan then points there). `scan` defaults to the CLT directory's name
    ("custom" without one); `tokenizer` (required) is the model's; `unique_error_ids`: see the module docstring.
    Serve with circuit-tracer's `serve(data_dir=out_dir)`."""
    stored = store.load_graph(graph_id)
    settings = json.loads(stored.info["settings"])
    threshold = settings.get("graph", {}).get("node_threshold", 0.8)
    clt_dir = _clt_dir(stored)
    scan = scan or (Path(clt_dir).name if clt_dir else "custom")
    if not scan or "/" in scan or scan in (".", ".."):
        raise FrontendExportError(f"scan must be a plain name (no '/'), got {scan!r}")
    panels = bool(clt_dir) and has_features(clt_dir)
    labels = open_features(clt_dir).labels() if panels else {}
    data = frontend_graph(stored, tokenizer, slug, f"./graph_data/{FEATURES_SUBDIR}/{scan}" if panels else scan,
                          threshold, labels, unique_error_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if panels:
        exported = {(int(n["layer"]), int(n["node_id"].split("_")[1])) for n in data["nodes"]
                    if n["feature_type"] == FEATURE_TYPES["feature"]}
        write_feature_files(clt_dir, exported, out_dir / FEATURES_SUBDIR / scan, scan)
    path = out_dir / f"{data['metadata']['slug']}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    index_path = out_dir / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g["slug"] != data["metadata"]["slug"]] + [data["metadata"]]
    index_path.write_text(json.dumps(index, indent=2))  # as circuit-tracer's add_graph_metadata (ASCII escapes)
    return path


def nodes_frame(graph: nx.DiGraph) -> pd.DataFrame:
    """The node attributes of a networkx graph as a DataFrame (handy after graph analysis)."""
    return pd.DataFrame.from_dict(dict(graph.nodes(data=True)), orient="index")
