"""Inputs of the report beyond the graph metrics: the sparsify stage's sparsity, one prompt's attention
on the gated model (gates off and on), and one example prompt per task with its strongest attention edge.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from attribution.replacement import tokenize_prompt
from comparison.config import CompareError
from comparison.graph_metrics import qk_edge_scores

# --------------------------------------------------------------------------------------------------
# Sparsity and one prompt's attention


def sparsity_table(metrics: Mapping) -> pd.DataFrame:
    """Open-edge fraction per (context_length, layer, head) from the sparsify stage's metrics.json, with the
    overall fraction at that context length (open gates / causal pairs over every layer and head)."""
    rows = []
    longer = [s for s in metrics.get("heldout_by_length", [])  # the training corpus at the other lengths
              if s["source"] == metrics.get("data_source") and s["context_length"] != metrics.get("context_length")]
    for section in (metrics.get("edges"), *longer):
        if not section:
            continue
        for layer, heads in enumerate(section["edge_fraction_per_head"]):
            rows += [(int(section["context_length"]), layer, head, float(f), float(section["edge_fraction"]))
                     for head, f in enumerate(heads)]
    if not rows:
        raise CompareError("the sparsify metrics hold no edge_fraction_per_head; rerun the sparsify stage")
    return pd.DataFrame(rows, columns=["context_length", "layer", "head", "edge_fraction", "overall_edge_fraction"])


def attention_pattern(gated, tokenizer, prompt: str) -> pd.DataFrame:
    """Attention weights applied to values for `prompt` with gates off (dense) and on (sparse): one row per
    (layer, head, query, key), key <= query."""
    tokens = torch.as_tensor(tokenize_prompt(tokenizer, prompt))[None].to(gated.offsets.device)
    mode = gated.mode
    weights = {}
    with torch.no_grad():
        for variant, gate_mode in (("dense", "dense"), ("sparse", "eval")):
            gated.set_mode(gate_mode)
            weights[variant] = torch.stack([a[0].float().cpu() for a in gated(tokens, output_attentions=True).attentions])
    gated.set_mode(mode)
    n_layers, n_heads, n_pos, _ = weights["dense"].shape
    layer, head, query, key = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(n_pos), np.arange(n_pos),
                                          indexing="ij")
    causal = (key <= query).ravel()
    frame = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "query": query.ravel(), "key": key.ravel(),
                          "dense": weights["dense"].numpy().ravel(), "sparse": weights["sparse"].numpy().ravel()})
    frame = frame[causal].reset_index(drop=True)
    strings = np.array([tokenizer.decode([t]) for t in tokens[0].tolist()], dtype=object)
    frame["query_token"], frame["key_token"] = strings[frame["query"]], strings[frame["key"]]
    return frame


# --------------------------------------------------------------------------------------------------
# Examples: one prompt per task, its graphs and their strongest attention edge


def strongest_attention_edge(head_loadings: pd.DataFrame) -> pd.Series | None:
    """The head part (head >= 0) of largest |weight| over a graph's edges, with its (query, key); parts
    whose (query, key) crosses positions first, since those are what attention adds."""
    heads = head_loadings[(head_loadings["head"] >= 0) & (head_loadings["query_pos"] >= 0)]
    if heads.empty:
        return None
    crossing = heads[heads["query_pos"] != heads["key_pos"]]
    heads = crossing if len(crossing) else heads
    return heads.loc[heads["weight"].abs().idxmax()]


def example_tables(store, metrics: pd.DataFrame, top_pairs: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per task, the first prompt attributed on every variant: its graph ids, and per graph the strongest
    attention edge and its top QK pairs by |value| (with the score they explain)."""
    examples, pair_rows = [], []
    for task, part in metrics.groupby("task", sort=True):
        variants = sorted(part["variant"].unique())
        both = part.groupby("pair")["variant"].nunique()
        pair = sorted(both[both == len(variants)].index, key=lambda p: part.loc[part["pair"] == p, "prompt_index"].min())
        if not pair:
            continue
        for row in part[part["pair"] == pair[0]].itertuples(index=False):
            stored = store.load_graph(row.graph_id)
            edge = strongest_attention_edge(stored.head_loadings)
            example = {"task": task, "variant": row.variant, "graph_id": row.graph_id, "pair": row.pair,
                       "prompt": row.prompt, "edge_target": None, "edge_source": None, "edge_weight": None,
                       "edge_n_heads": None, "layer": None, "head": None,
                       "query_pos": None, "key_pos": None, "head_part": None, "gate_logit": None, "score": None}
            if edge is not None:
                loadings = stored.head_loadings
                on_edge = loadings[(loadings["target"] == edge["target"]) & (loadings["source"] == edge["source"])]
                edges = stored.edges
                weight = edges.loc[(edges["target"] == edge["target"]) & (edges["source"] == edge["source"]), "weight"]
                example.update(edge_target=int(edge["target"]), edge_source=int(edge["source"]),
                               edge_weight=float(weight.iloc[0]), edge_n_heads=int((on_edge["head"] >= 0).sum()),
                               layer=int(edge["layer"]), head=int(edge["head"]), query_pos=int(edge["query_pos"]),
                               key_pos=int(edge["key_pos"]), head_part=float(edge["weight"]))
                pairs = stored.qk_pairs
                chosen = pairs[(pairs["layer"] == example["layer"]) & (pairs["head"] == example["head"])
                               & (pairs["query_pos"] == example["query_pos"]) & (pairs["key_pos"] == example["key_pos"])]
                if len(chosen):
                    scored = qk_edge_scores(chosen).iloc[0]
                    example["gate_logit"], example["score"] = float(scored["gate_logit"]), float(scored["score"])
                    top = chosen[chosen["kind"] == "pair"]
                    top = top.loc[top["value"].abs().sort_values(ascending=False, kind="stable").index[:top_pairs]]
                    pair_rows += [{"task": task, "variant": row.variant, "graph_id": row.graph_id, "rank": rank,
                                   "query_component": p.query_component, "key_component": p.key_component,
                                   "value": float(p.value), "share_of_score": float(p.value) / example["score"]
                                   if example["score"] else np.nan}
                                  for rank, p in enumerate(top.itertuples(index=False))]
            examples.append(example)
    pair_columns = ["task", "variant", "graph_id", "rank", "query_component", "key_component", "value", "share_of_score"]
    return pd.DataFrame(examples), pd.DataFrame(pair_rows, columns=pair_columns)
