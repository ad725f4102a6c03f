"""What the viewer's JSON endpoints return, read from a graph store through its public API.

Every function returns plain JSON-able values (no NaN: missing numbers are None). Bad input (an id or
node the store refuses, a malformed number) raises StoreError or BadRequest; what is absent (a graph,
an attention edge without QK attribution, dashboards the CLT does not have) raises GraphNotFoundError
or NotFound, each with a message that says what and why.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.store import GraphStore, StoreError, check_id
from comparison.formatting import component_label
from transcoders.features import FEATURES_DIR, META_FILE, has_features, open_features

Labels = dict[tuple[int, int], str]  # (layer, feature) -> dashboard label

GRAPH_LIST_COLUMNS = ["graph_id", "variant", "prompt", "task", "prompt_index", "model", "n_layers", "n_pos",
                      "n_nodes_kept", "n_edges_kept", "replacement_score", "completeness_score",
                      "pruned_replacement_score", "pruned_completeness_score", "created"]
NODE_COLUMNS = ["node_index", "node_id", "kind", "layer", "pos", "feature", "activation", "value", "token_prob",
                "influence"]
HEAD_COLUMNS = ["layer", "head", "weight", "query_pos", "key_pos", "pair_share"]
ATTENTION_EDGE = ["layer", "head", "query_pos", "key_pos"]
SKIP_HEAD, OTHER_HEADS = -1, -2  # head_loadings rows that are no single head (attribution/schema.py)


class NotFound(LookupError):
    """Something the store or the CLT directory does not hold; the message says what."""


class BadRequest(ValueError):
    """A request parameter that is missing or malformed; the message names it."""


def plain(value):
    """A JSON-able Python value: numpy scalars and arrays as Python ones, NaN and missing as None."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if hasattr(value, "item"):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def records(frame: pd.DataFrame, columns: list[str]) -> list[dict]:
    """The rows of `frame[columns]` as JSON-able dicts."""
    return [{c: plain(v) for c, v in zip(columns, row)} for row in frame[columns].itertuples(index=False)]


def graph_id_of(text: str) -> str:
    """A graph id as the store accepts it, else BadRequest (the store's message)."""
    try:
        return check_id(text)
    except StoreError as err:
        raise BadRequest(str(err)) from None


def clt_dir_of(info: pd.Series) -> Path | None:
    """The CLT directory a graph's `clt` JSON records, or None when it records none."""
    try:
        return Path(json.loads(info["clt"])["dir"])
    except (ValueError, TypeError, KeyError):
        return None


def head_name(layer: int, head: int) -> str:
    """How the viewer names one head_loadings row's head."""
    if head == SKIP_HEAD:
        return f"L{layer} skip (residual)"
    if head == OTHER_HEADS:
        return f"L{layer} other heads"
    return f"L{layer}H{head}"


class ViewerData:
    """The viewer's reads of one store; feature labels are cached per CLT directory until its dashboards
    change."""

    def __init__(self, store: GraphStore):
        self.store = store
        self._labels: dict[Path, tuple[int, Labels]] = {}
        self._lock = threading.Lock()

    # -- dashboards -----------------------------------------------------------------------------
    def labels(self, clt_dir: Path | None) -> Labels:
        """The dashboard labels of a CLT directory, {} when it has no dashboards."""
        if clt_dir is None or not has_features(clt_dir):
            return {}
        stamp = (clt_dir / FEATURES_DIR / META_FILE).stat().st_mtime_ns
        with self._lock:
            cached = self._labels.get(clt_dir)
            if cached is None or cached[0] != stamp:
                cached = (stamp, open_features(clt_dir).labels())
                self._labels[clt_dir] = cached
            return cached[1]

    # -- endpoints ------------------------------------------------------------------------------
    def graphs(self) -> list[dict]:
        """Every committed graph: id, variant, prompt, sizes and scores; by prompt, variant, graph id."""
        listed = self.store.list_graphs()
        listed = listed.sort_values(["prompt", "variant", "graph_id"], kind="stable")
        return records(listed, GRAPH_LIST_COLUMNS)

    def graph(self, graph_id: str) -> dict:
        """One graph pruned: its kept nodes (feature nodes with their dashboard label) and the kept edges
        between them by |weight|, each with the number of heads whose loadings it has."""
        graph_id = graph_id_of(graph_id)
        info = self.store.graph_info(graph_id)
        clt_dir = clt_dir_of(info)
        labels = self.labels(clt_dir)
        token_strings = [str(t) for t in info["token_strings"]]
        nodes = self.store.read_table("nodes", graph_id)
        nodes = nodes[nodes["kept"]]
        kept_ids = set(nodes["node_id"])
        edges = self.store.top_edges(graph_id, k=max(int(info["n_edges_kept"]), 1))
        edges = edges[edges["source_id"].isin(kept_ids) & edges["target_id"].isin(kept_ids)]
        loadings = self.store.read_table("head_loadings", graph_id, columns=["target", "source", "head"])
        heads = loadings[loadings["head"] >= 0].groupby(["target", "source"]).size()
        edge_heads = heads.reindex(pd.MultiIndex.from_arrays([edges["target"], edges["source"]])).fillna(0)

        node_rows = records(nodes, NODE_COLUMNS)
        for row in node_rows:
            row["label"] = self.node_label(row, labels, token_strings)
        return {
            **{c: plain(info[c]) for c in GRAPH_LIST_COLUMNS},
            "token_strings": token_strings,
            "logit_tokens": plain(info["logit_tokens"]),
            "logit_probs": plain(info["logit_probs"]),
            "clt_dir": None if clt_dir is None else str(clt_dir),
            "has_dashboards": clt_dir is not None and has_features(clt_dir),
            "nodes": node_rows,
            "edges": [{"source": s, "target": t, "weight": plain(w), "heads": int(h)}
                      for s, t, w, h in zip(edges["source_id"], edges["target_id"], edges["weight"], edge_heads)],
        }

    @staticmethod
    def node_label(node: dict, labels: Labels, token_strings: list[str]) -> str | None:
        """Features: the dashboard label (None without one); tokens: the token's text; logits: the token id
        and probability (the store keeps logit token ids only); errors: None."""
        if node["kind"] == "feature":
            return labels.get((node["layer"], node["feature"]))
        if node["kind"] == "token":
            return token_strings[node["pos"]]
        if node["kind"] == "logit":
            return f"token {node['feature']} (p={node['token_prob']:.3f})"
        return None

    def edge_heads(self, graph_id: str, source: str, target: str) -> dict:
        """The head loadings of one edge (source -> target node ids): per carrying layer, the heads' parts
        (with the (query, key) pair carrying most of each), other heads (-2) and the skip part (-1); a row
        has `qk` when its attention edge has a QK attribution."""
        graph_id = graph_id_of(graph_id)
        ids = set(self.store.read_table("nodes", graph_id, columns=["node_id"])["node_id"])
        for role, node in (("source", source), ("target", target)):
            if node not in ids:
                raise NotFound(f"graph {graph_id} has no node {node!r} (the {role})")
        edges = self.store.edges_into(graph_id, target)
        edge = edges[edges["source_id"] == source]
        if edge.empty:
            raise NotFound(f"graph {graph_id} stores no edge {source} -> {target}")
        rows = self.store.heads_for_edge(graph_id, target, source)
        rows = rows.sort_values(["layer", "weight"], key=lambda c: c.abs() if c.name == "weight" else c,
                                ascending=[True, False], kind="stable")
        attributed = self.store.read_table("qk_pairs", graph_id, columns=ATTENTION_EDGE).drop_duplicates()
        with_qk = set(attributed.itertuples(index=False, name=None))
        out = records(rows, HEAD_COLUMNS)
        for row in out:
            row["name"] = head_name(row["layer"], row["head"])
            row["qk"] = (row["layer"], row["head"], row["query_pos"], row["key_pos"]) in with_qk
        kept = bool(edge["kept"].iloc[0])
        return {"graph_id": graph_id, "source": source, "target": target, "weight": plain(edge["weight"].iloc[0]),
                "kept": kept, "heads": out, "no_heads_because": None if out else self._no_heads_reason(
                    graph_id, source, target, kept)}

    def _no_heads_reason(self, graph_id: str, source: str, target: str, kept: bool) -> str:
        """Why an edge has no head loadings: pruning dropped it, it crosses no attention layer, attention
        attribution was off, its heads carry less than attention.layer_min_share of it in every layer it crosses,
        or it is outside the most influential edges the stage loads (attention.edge_influence_share; the store does
        not say which of the last two)."""
        if not kept:
            return "pruning dropped this edge; head loadings are computed for kept edges only"
        info = self.store.graph_info(graph_id)
        nodes = self.store.read_table("nodes", graph_id, columns=["node_id", "layer"]).set_index("node_id")["layer"]
        n_layers = int(info["n_layers"])
        # attention layers source + 1 .. target (tokens write at -1; logits read after the last layer, n_layers - 1)
        if int(nodes[source]) >= min(int(nodes[target]), n_layers - 1):
            return "the edge crosses no attention layer (source and target at the same layer)"
        attention = json.loads(info["settings"]).get("attention", {})
        if not attention.get("enabled", True):
            return "attention attribution was off for this graph (attention.enabled: false): no edge has head loadings"
        residual = (f"in every layer it crosses, its heads carry less than attention.layer_min_share "
                    f"({attention.get('layer_min_share'):g}) of it: it runs through the residual")
        share = attention.get("edge_influence_share", 1.0)
        if share < 1:
            return (f"either it is not among the most influential kept edges holding {share:g} of their influence "
                    f"on the logits (attention.edge_influence_share, the edges head-loaded), or {residual}")
        return residual

    def attention_edge(self, graph_id: str, layer: int, head: int, query_pos: int, key_pos: int) -> dict:
        """The QK attribution of one attention edge: its gate logit split into the top (query component,
        key component) pairs + the rest + the offset, and per side the top marginals + rest; each component
        with a readable name (feature components with their dashboard label). With an attention soft-cap
        (`attn_logit_softcap`, Gemma-2) the pairs split the pre-cap score s: gate logit = cap * tanh(s / cap) + offset."""
        graph_id = graph_id_of(graph_id)
        rows = self.store.qk_pairs(graph_id, layer, head, query_pos, key_pos)
        if rows.empty:
            raise NotFound(f"graph {graph_id} has no QK attribution of attention edge L{layer}H{head} "
                           f"query {query_pos} key {key_pos} (the stage attributes the max_attention_edges "
                           "largest attention edges of the kept edges' head loadings)")
        info = self.store.graph_info(graph_id)
        labels = self.labels(clt_dir_of(info))
        tokens = [str(t) for t in info["token_strings"]]

        def name(component: str) -> str:
            return "all others" if component == "*" else component_label(component, labels, tokens)

        def part(kind: str, side: str | None = None) -> list[dict]:
            chosen = rows[rows["kind"] == kind]
            chosen = chosen.loc[chosen["value"].abs().sort_values(ascending=False, kind="stable").index]
            out = []
            for q, k, value in zip(chosen["query_component"], chosen["key_component"], chosen["value"]):
                if side is None:
                    out.append({"query": q, "key": k, "query_name": name(q), "key_name": name(k), "value": plain(value)})
                else:
                    component = q if side == "query" else k
                    out.append({"component": component, "name": name(component), "value": plain(value)})
            return out

        def total(kind: str) -> float:
            return plain(rows.loc[rows["kind"] == kind, "value"].sum())

        return {"graph_id": graph_id, "layer": layer, "head": head, "query_pos": query_pos, "key_pos": key_pos,
                "name": f"L{layer}H{head} {query_pos}->{key_pos}", "gate_logit": plain(rows["gate_logit"].iloc[0]),
                "pairs": part("pair"), "pair_rest": total("pair_rest"), "offset": total("offset"),
                "attn_logit_softcap": plain(info.get("attn_logit_softcap")),
                "query_marginals": part("query_marginal", "query"), "query_marginal_rest": total("query_marginal_rest"),
                "key_marginals": part("key_marginal", "key"), "key_marginal_rest": total("key_marginal_rest")}

    def feature(self, graph_id: str, layer: int, feature: int) -> dict:
        """The dashboard of one feature of the graph's CLT: its row of the features table and its top and
        random contexts (token strings and the feature's activation on each)."""
        graph_id = graph_id_of(graph_id)
        clt_dir = clt_dir_of(self.store.graph_info(graph_id))
        if clt_dir is None:
            raise NotFound(f"graph {graph_id} records no CLT directory, so it has no feature dashboards")
        if not has_features(clt_dir):
            raise NotFound(f"the CLT directory {clt_dir} of graph {graph_id} holds no feature dashboards; "
                           "run the pipeline's features stage (transcoders.stage.build_features)")
        dashboards = open_features(clt_dir)
        table = dashboards.features()
        row = table[(table["layer"] == layer) & (table["feature"] == feature)]
        if row.empty:
            raise NotFound(f"the dashboards in {clt_dir} have no feature {feature} of layer {layer}")
        examples = dashboards.examples(layer, feature)
        contexts = {kind: [{"rank": plain(e.rank), "activation": plain(e.activation),
                            "window_index": plain(e.window_index), "tokens": [str(t) for t in e.token_strings],
                            "activations": plain(e.activations)}
                           for e in examples[examples["kind"] == kind].sort_values("rank").itertuples()]
                    for kind in ("top", "random")}
        return {**{c: plain(v) for c, v in row.iloc[0].items() if not c.endswith("_ids")},
                "graph_id": graph_id, **contexts}
