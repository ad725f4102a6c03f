"""Turn one computed graph (plus pruning and attention attribution) into the store's Arrow tables."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import torch

from attribution.graph import NODE_KINDS, AttributionGraph
from attribution.prune import PruneResult, graph_scores
from attribution.schema import ROW_COUNTS, SCHEMAS, TABLES


@dataclass
class GraphRecord:
    """Everything stored for one graph: its id, variant and one Arrow table per store table."""

    graph_id: str
    variant: str
    tables: dict[str, pa.Table] = field(default_factory=dict)


def storable_text(text: str) -> str:
    """`text` as valid UTF-8 (what Parquet stores): characters that cannot be encoded, such as lone
    surrogates, become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def make_graph_id(variant: str, model: str, clt: str, prompt: str, settings: str) -> str:
    """Deterministic id: the same prompt, model, CLT and settings always get the same graph_id."""
    key = json.dumps([variant, model, clt, prompt, settings])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def empty_table(name: str) -> pa.Table:
    return TABLES[name].empty_table()


def _table(name: str, columns: dict) -> pa.Table:
    schema = SCHEMAS[name]
    return pa.table({f.name: pa.array(columns[f.name], type=f.type) for f in schema}, schema=schema)


def nodes_table(graph_id: str, graph: AttributionGraph, pruned: PruneResult) -> pa.Table:
    table = graph.node_table()
    kind = table["kind"]
    n_nodes = graph.n_nodes
    is_feature, is_logit = kind == 0, kind == 3
    activation = torch.zeros(n_nodes)
    activation[:graph.n_selected] = graph.activations[graph.selected]
    token_prob = torch.zeros(n_nodes)
    token_prob[graph.logit_start:] = graph.logit_probs
    has_value = is_feature | is_logit

    def masked(values: torch.Tensor, mask: torch.Tensor) -> list:
        return [v if m else None for v, m in zip(values.tolist(), mask.tolist())]

    return _table("nodes", {
        "graph_id": [graph_id] * n_nodes,
        "node_index": range(n_nodes),
        "node_id": graph.node_ids(),
        "kind": [NODE_KINDS[k] for k in kind.tolist()],
        "layer": table["layer"].tolist(),
        "pos": table["pos"].tolist(),
        "feature": table["feature"].tolist(),
        "activation": masked(activation, is_feature),
        "value": masked(graph.node_value, has_value),
        "constant": masked(graph.node_constant, has_value),
        "token_prob": masked(token_prob, is_logit),
        "influence": pruned.node_influence.tolist(),
        "cumulative_influence": pruned.cumulative_influence.tolist(),
        "kept": pruned.node_mask.tolist(),
    })


def edges_table(graph_id: str, graph: AttributionGraph, pruned: PruneResult, which: str) -> pa.Table:
    """Nonzero edges (all, or only those kept by pruning): kept edges first, each part sorted by |weight|
    descending, so the top kept edges are the first rows."""
    edge_rows = pruned.edge_rows(graph.row_nodes)  # the graph's rows only: errors and tokens have no incoming edges
    mask = graph.rows != 0
    if which == "pruned":
        mask &= edge_rows
    row, source = mask.nonzero().unbind(1)
    del mask
    target, weight, kept = graph.row_nodes[row], graph.rows[row, source], edge_rows[row, source]
    order = torch.argsort(weight.abs(), descending=True, stable=True)
    order = order[torch.argsort(~kept[order], stable=True)]  # kept first, |weight| order kept within
    return _table("edges", {
        "graph_id": [graph_id] * len(weight),
        "target": target[order].numpy().astype("int32"),
        "source": source[order].numpy().astype("int32"),
        "weight": weight[order].numpy(),
        "kept": kept[order].numpy(),
    })


def graphs_table(graph_id: str, variant: str, graph: AttributionGraph, pruned: PruneResult, *,
                 token_strings: list[str], model: str, clt: str, settings: str, edges_stored: str,
                 seconds: float, task: str = "custom", prompt_index: int = 0) -> pa.Table:
    """The one-row commit record of a graph, with its unpruned and pruned scores."""
    rows, row_nodes = graph.rows, graph.row_nodes  # the graph's nonzero rows (features, logits): no [N, N] matrix
    replacement, completeness = graph_scores(rows, graph.logit_probs, graph.n_selected, graph.n_layers, graph.n_pos,
                                             row_nodes=row_nodes)
    edge_rows = pruned.edge_rows(row_nodes)
    kept = rows * (edge_rows & pruned.node_mask[row_nodes, None] & pruned.node_mask[None, :])
    pruned_replacement, pruned_completeness = graph_scores(kept, graph.logit_probs, graph.n_selected,
                                                           graph.n_layers, graph.n_pos, row_nodes=row_nodes)
    n_edges_kept = int((edge_rows & (rows != 0)).sum())
    return _table("graphs", {
        "graph_id": [graph_id], "variant": [variant], "prompt": [graph.prompt],
        "task": [task], "prompt_index": [prompt_index], "tokens": [graph.tokens.tolist()], "token_strings": [token_strings],
        "model": [model], "clt": [clt], "settings": [settings],
        "n_layers": [graph.n_layers], "n_pos": [graph.n_pos],
        "n_active_features": [len(graph.active_features)], "n_selected_features": [graph.n_selected],
        "n_logits": [len(graph.logit_tokens)], "n_nodes": [graph.n_nodes],
        "n_edges": [int((rows != 0).sum())],
        "n_nodes_kept": [int(pruned.node_mask.sum())],
        "n_edges_kept": [n_edges_kept],
        "edges_stored": [edges_stored],
        "logit_tokens": [graph.logit_tokens.tolist()], "logit_probs": [graph.logit_probs.tolist()],
        "attn_logit_softcap": [graph.attn_softcap], "final_logit_softcap": [graph.final_softcap],
        "replacement_score": [replacement], "completeness_score": [completeness],
        "pruned_replacement_score": [pruned_replacement], "pruned_completeness_score": [pruned_completeness],
        "seconds": [seconds], "created": [datetime.now(timezone.utc)],
        **{column: [None] for column in ROW_COUNTS.values()},  # set by the store when it writes the graph
    })


def from_frame(name: str, graph_id: str, frame) -> pa.Table:
    """A pandas DataFrame (without graph_id) as the store table `name`, column by column from numpy (NaN
    becomes null: a float that does not apply, such as the pair share of a skip row)."""
    if frame is None or len(frame) == 0:
        return empty_table(name)
    schema = SCHEMAS[name]
    columns = {f.name: pa.array(frame[f.name].to_numpy(), type=f.type, from_pandas=True)
               for f in schema if f.name != "graph_id"}
    columns["graph_id"] = pa.array(np.full(len(frame), graph_id, dtype=object), type=pa.string())
    return pa.table({f.name: columns[f.name] for f in schema}, schema=schema)


def failure_table(failure_id: str, variant: str, prompt: str, task: str, prompt_index: int,
                  error: Exception) -> pa.Table:
    """The one-row `failures` record of a prompt that could not be attributed."""
    return _table("failures", {
        "failure_id": [failure_id], "variant": [variant], "prompt": [storable_text(prompt)], "task": [task],
        "prompt_index": [prompt_index], "error_type": [type(error).__name__], "message": [storable_text(str(error))],
        "created": [datetime.now(timezone.utc)],
    })
