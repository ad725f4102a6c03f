"""Metrics of one stored graph, as pure functions over its tables, and of every graph in a store.

Per graph (variant, task, prompt_index), from the store's tables only:
- sizes after pruning: `n_nodes_kept`, `n_edges_kept` (graphs table), `n_features_kept` (nodes table);
- `n_edges_influence_{80,90}`: edges of the pruned graph holding that share of its edge influence
  (`edge_influence`: circuit-tracer's edge score recomputed on the pruned graph);
- heads and attention edges carrying the graph's edges (head_loadings, head >= 0; `head_metrics`), each head
  part weighted by the logit influence of the edge it carries (`head_part_influence`), attention into the BOS
  sink (key position 0) counted apart (`n_sink_attention_edges`, `sink_share`); over the edges that have head
  loadings: the most influential holding the graph's `attention.edge_influence_share` of the influence of the
  edges crossing attention (in its settings; 1: every kept edge);
- `qk_top{k}_share`: influence-weighted median over the graph's QK-attributed attention edges that carry
  influence, neither into the BOS sink nor from a BOS query (one embedding pair explains those trivially), of
  the share of the edge's score explained by its top-k (query, key) component pairs (`qk_edge_shares`);
- replacement and completeness scores, unpruned and pruned (graphs table).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pandas as pd
from tqdm import tqdm

from comparison.config import CompareConfig, CompareError


def share_name(share: float) -> str:
    return f"{round(100 * share)}"


def count_to_share(values: np.ndarray, share: float) -> int:
    """Smallest number of the largest `values` (>= 0) whose sum reaches `share` of their total; 0 if empty."""
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    total = values.sum()
    if len(values) == 0 or total <= 0:
        return 0
    cumulative = np.cumsum(values)
    return int(np.argmax(cumulative >= share * total * (1 - 1e-12))) + 1


def edge_influence(target: np.ndarray, source: np.ndarray, weight: np.ndarray, logit_weight: np.ndarray) -> np.ndarray:
    """circuit-tracer's edge scores on the graph made of the given edges (rows = targets).

    With |A| row-normalised over these edges, node influence I = w (A + A^2 + ...) for the logit weights w
    (the logit nodes' probabilities), edge score(t, s) = |A|[t, s] * (I[t] + w[t]).  target, source, weight
    [E] (node indices), logit_weight [N]  ->  [E].
    """
    n = len(logit_weight)
    absolute = np.abs(np.asarray(weight, dtype=np.float64))
    row_sum = np.bincount(target, absolute, minlength=n)
    normalized = absolute / np.maximum(row_sum[target], 1e-30)
    influence = np.zeros(n)
    current = np.asarray(logit_weight, dtype=np.float64)
    for _ in range(n + 1):
        current = np.bincount(source, current[target] * normalized, minlength=n)
        if not current.any():
            return normalized * (influence + logit_weight)[target]
        influence += current
    raise CompareError("edge influence did not converge: the stored edges form a cycle; the store is corrupted")


def pruned_edge_influence(nodes: pd.DataFrame, edges: pd.DataFrame) -> np.ndarray:
    """Edge scores (`edge_influence`) of the kept edges of a stored graph, in the order of `edges[kept]`."""
    kept = edges[edges["kept"]]
    logit_weight = np.zeros(int(nodes["node_index"].max()) + 1 if len(nodes) else 0)
    logits = nodes[nodes["kind"] == "logit"]
    logit_weight[logits["node_index"].to_numpy()] = logits["token_prob"].to_numpy(dtype=np.float64)
    return edge_influence(kept["target"].to_numpy(), kept["source"].to_numpy(), kept["weight"].to_numpy(),
                          logit_weight)


def head_part_influence(head_loadings: pd.DataFrame, edges: pd.DataFrame, edge_scores: np.ndarray) -> np.ndarray:
    """Each head-loadings row's share of the logit influence its graph edge carries: the edge's influence score
    (`pruned_edge_influence`, in the order of `edges[kept]`) times the row's share of the |parts| of its (edge,
    layer) (the rows of one edge and carrying layer sum to the edge weight).  -> [rows]; 0 for edges not kept."""
    if head_loadings.empty:
        return np.zeros(0)
    kept = edges[edges["kept"]]
    score = pd.Series(np.asarray(edge_scores, dtype=np.float64),
                      index=pd.MultiIndex.from_arrays([kept["target"], kept["source"]]))
    part = head_loadings["weight"].abs().astype(np.float64)
    total = part.groupby([head_loadings["target"], head_loadings["source"], head_loadings["layer"]]).transform("sum")
    rows = pd.MultiIndex.from_arrays([head_loadings["target"], head_loadings["source"]])
    influence = score.reindex(rows).fillna(0.0).to_numpy()
    return np.where(total.to_numpy() > 0, part.to_numpy() / np.maximum(total.to_numpy(), 1e-300), 0.0) * influence


def head_metrics(head_loadings: pd.DataFrame, min_share: float, cover: float,
                 influence: np.ndarray | None = None) -> dict:
    """Heads and attention edges carrying a graph's edges (rows with head >= 0; the skip -1 and the summed
    other heads -2 are no head). A row's mass is `influence` (`head_part_influence`; default its |part|).
    Attention into position 0 (the BOS sink) is reported apart: the other metrics count non-sink mass only.

    n_heads_any: heads with any part; n_heads_carrying: heads with >= min_share of the non-sink mass;
    n_heads_cover: fewest heads holding `cover` of it; n_attention_edges: distinct non-sink (layer, head,
    query, key) named by the rows (each row names the pair carrying most of its head's part);
    n_attention_edges_cover: fewest of them holding `cover` of the non-sink mass; n_sink_attention_edges:
    distinct attention edges into position 0; sink_share: the sink rows' share of all head mass."""
    heads = head_loadings["head"].to_numpy() >= 0
    mass = np.abs(head_loadings["weight"].to_numpy(np.float64)) if influence is None else np.asarray(influence)
    rows = head_loadings[heads].assign(mass=mass[heads])
    sink = rows["key_pos"] == 0 if "key_pos" in rows else pd.Series(False, index=rows.index)
    signal = rows[~sink]
    per_head = signal.groupby(["layer", "head"])["mass"].sum().to_numpy(np.float64)
    total = per_head.sum()
    keys = ["layer", "head", "query_pos", "key_pos"]
    has_pairs = set(keys) <= set(rows.columns)
    per_edge = signal.groupby(keys)["mass"].sum().to_numpy(np.float64) if has_pairs else np.zeros(0)
    all_mass = rows["mass"].sum()
    return {"n_heads_any": int(rows[["layer", "head"]].drop_duplicates().shape[0]),
            "n_heads_carrying": int((per_head >= min_share * total).sum()) if total > 0 else 0,
            "n_heads_cover": count_to_share(per_head, cover),
            "n_attention_edges": int(len(per_edge)),
            "n_attention_edges_cover": count_to_share(per_edge, cover),
            "n_sink_attention_edges": int(rows[sink][keys].drop_duplicates().shape[0]) if has_pairs else 0,
            "sink_share": float(rows.loc[sink, "mass"].sum() / all_mass) if all_mass > 0 else np.nan}


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value at which the cumulative weight (values sorted) first reaches half the total; NaN if none."""
    values, weights = np.asarray(values, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    keep = np.isfinite(values) & (weights > 0)
    if not keep.any():
        return np.nan
    order = np.argsort(values[keep], kind="stable")
    cumulative = np.cumsum(weights[keep][order])
    return float(values[keep][order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])


QK_KEYS = ["layer", "head", "query_pos", "key_pos"]
# the scores the attribution stage stores per graph (attribution/schema.py), carried into each metrics row
GRAPH_SCORES = ("replacement_score", "completeness_score", "pruned_replacement_score", "pruned_completeness_score")


def qk_edge_scores(qk_pairs: pd.DataFrame) -> pd.DataFrame:
    """Per QK-attributed attention edge (index QK_KEYS, sorted): its gate logit, its offset and the score
    the pairs split, score = pairs + pair_rest (= gate logit - offset; the pre-cap score where the model
    soft-caps attention scores, gate logit = cap * tanh(score / cap) + offset), as float64. qk_pairs: rows
    of the qk_pairs table."""
    edges = qk_pairs.groupby(QK_KEYS, sort=True)["gate_logit"].first().astype(np.float64).to_frame()
    offsets = qk_pairs[qk_pairs["kind"] == "offset"].groupby(QK_KEYS)["value"].sum()
    edges["offset"] = offsets.reindex(edges.index, fill_value=0.0).astype(np.float64)
    split = qk_pairs[qk_pairs["kind"].isin(["pair", "pair_rest"])]
    edges["score"] = split["value"].astype(np.float64).groupby([split[k] for k in QK_KEYS]).sum().reindex(
        edges.index, fill_value=0.0)
    return edges


def qk_edge_shares(qk_pairs: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """Per QK-attributed attention edge: its gate logit, offset, score = pairs + pair_rest (pre-cap),
    and top{k}_share = (sum of its k pairs of largest |value|) / score. The offset is left out: no pair can
    explain it, and the dense model has none. One row per (layer, head, query_pos, key_pos), sorted."""
    columns = [*QK_KEYS, "gate_logit", "offset", "score", "n_pairs", "top_query", "top_key", "top_value",
               *[f"top{k}_share" for k in ks]]
    if qk_pairs.empty:
        return pd.DataFrame(columns=columns)
    edges = qk_edge_scores(qk_pairs)
    pairs = qk_pairs[qk_pairs["kind"] == "pair"].copy()
    pairs["magnitude"] = pairs["value"].abs()
    pairs = pairs.sort_values([*QK_KEYS, "magnitude"], ascending=[True] * len(QK_KEYS) + [False], kind="stable")
    rank = pairs.groupby(QK_KEYS).cumcount()
    edges["n_pairs"] = pairs.groupby(QK_KEYS).size().reindex(edges.index, fill_value=0)
    top = pairs[rank == 0].set_index(QK_KEYS)
    edges["top_query"] = top["query_component"].reindex(edges.index)
    edges["top_key"] = top["key_component"].reindex(edges.index)
    edges["top_value"] = top["value"].astype(np.float64).reindex(edges.index)
    score = edges["score"].where(edges["score"] != 0)
    for k in ks:
        top_sum = pairs[rank < k].groupby(QK_KEYS)["value"].sum().astype(np.float64)
        edges[f"top{k}_share"] = top_sum.reindex(edges.index, fill_value=0.0) / score
    return edges.reset_index()[columns]


def pair_key(task: str, prompt_index: int, prompt: str) -> str:
    """What pairs a dense graph with its sparse one: the task and the prompt's index, or the prompt text."""
    return f"custom:{prompt}" if task == "custom" else f"{task}:{int(prompt_index)}"


def graph_metrics(info: Mapping, nodes: pd.DataFrame, edges: pd.DataFrame, head_loadings: pd.DataFrame,
                  qk_edges: pd.DataFrame, config: CompareConfig) -> dict:
    """The comparison metrics of one stored graph (info: its graphs row; qk_edges: `qk_edge_shares`)."""
    attention = json.loads(info["settings"]).get("attention", {}).get("enabled", True)
    scores = pruned_edge_influence(nodes, edges)
    row = {key: info[key] for key in ("graph_id", "variant", "task", "prompt_index", "prompt", "n_pos", "n_nodes",
                                      "n_edges", "n_nodes_kept", "n_edges_kept")}
    row["pair"] = pair_key(info["task"], info["prompt_index"], info["prompt"])
    row["n_features_kept"] = int(((nodes["kind"] == "feature") & nodes["kept"]).sum())
    for share in config.influence_shares:
        row[f"n_edges_influence_{share_name(share)}"] = count_to_share(scores, share)
    influence = head_part_influence(head_loadings, edges, scores)
    heads = head_metrics(head_loadings, config.head_min_share, config.head_cover, influence)
    row.update({k: v if attention else np.nan for k, v in heads.items()})
    row["n_qk_attributed_edges"] = len(qk_edges) if attention else np.nan  # capped by max_attention_edges
    # the QK explanation of attention edges that carry the graph's influence, weighted by it; not the BOS sink
    # (a key at position 0 is explained trivially by the two embeddings) nor a BOS query (it sees only BOS)
    carried = head_loadings[head_loadings["head"] >= 0].assign(mass=influence[head_loadings["head"].to_numpy() >= 0])
    weight = carried.groupby(QK_KEYS)["mass"].sum() if len(carried) else pd.Series(dtype=float)
    explained = qk_edges[(qk_edges["query_pos"] > 0) & (qk_edges["key_pos"] > 0)] if len(qk_edges) else qk_edges
    edge_weight = (weight.reindex(pd.MultiIndex.from_frame(explained[QK_KEYS])).fillna(0.0).to_numpy()
                   if len(explained) else np.zeros(0))
    for k in config.qk_top_k:
        shares = explained[f"top{k}_share"].to_numpy(np.float64) if len(explained) else np.zeros(0)
        row[f"qk_top{k}_share"] = weighted_median(shares, edge_weight) if attention else np.nan
    for key in GRAPH_SCORES:
        row[key] = float(info[key])
    return row


def metric_columns(config: CompareConfig) -> list[str]:
    """The per-graph metrics summarised per task, in report order."""
    return ["n_nodes_kept", "n_edges_kept", "n_features_kept",
            *[f"n_edges_influence_{share_name(s)}" for s in config.influence_shares],
            "n_heads_any", "n_heads_carrying", "n_heads_cover", "n_attention_edges", "n_attention_edges_cover",
            "n_sink_attention_edges", "sink_share", "n_qk_attributed_edges",
            *[f"qk_top{k}_share" for k in config.qk_top_k],
            *GRAPH_SCORES]


def store_metrics(store, config: CompareConfig, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(graph_metrics: one row per graph, qk_edges: one row per attention edge with its graph_id)."""
    graphs = store.list_graphs()
    if graphs.empty:
        raise CompareError(f"the store at {store.root} holds no graphs; run the attribution stage first")
    rows, qk_frames = [], []
    records = graphs.sort_values(["variant", "task", "prompt_index", "prompt"]).to_dict("records")
    for info in tqdm(records, desc="compare graphs", disable=not progress):
        stored = store.load_graph(info["graph_id"])
        qk = qk_edge_shares(stored.qk_pairs, config.qk_top_k)
        rows.append(graph_metrics(info, stored.nodes, stored.edges, stored.head_loadings, qk, config))
        qk.insert(0, "graph_id", info["graph_id"])
        qk.insert(1, "variant", info["variant"])
        qk_frames.append(qk)
    qk_edges = pd.concat(qk_frames, ignore_index=True) if qk_frames else pd.DataFrame()
    return pd.DataFrame(rows), qk_edges
