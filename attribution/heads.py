"""Head loadings: every kept edge split exactly into one part per attention head, per layer.

Every linear path from a source's write to a target's readout either passes through the attention of
layer j - through exactly one head h - or skips it through the residual. So for each layer j between
the two nodes, edge = sum_h part[j, h] + skip[j], with

    part[j, h] = sum_q z_j[t, q, h] . u_j[s, q, h]

where z_j[t] = W_O^h^T (d target / d resid_mid[j]) (target side, from a backward sweep) and
u_j[s, q, h] = sum_k pattern[j, h, q, k] v_j[s, k, h] is head h's output, before W_O, caused by the
source's whole effect on resid_pre[j] (source side, from a forward sweep). skip[j] = edge - sum_h part.
For the heads stored, the (query, key) pair carrying most of the part is named too.
"""

from __future__ import annotations

import pandas as pd
import torch

from attribution.config import AttentionAttributionConfig
from attribution.graph import AttributionGraph
from attribution.nodes import LocalReplacementModel
from attribution.propagate import TargetSet, attention_vjp, feature_targets, logit_targets

SKIP_HEAD = -1  # the part of an edge that skips the layer's attention
OTHER_HEADS = -2  # the parts of the heads below head_min_share, summed

EDGE_SLICE = 1024  # edges whose per-position head vectors are held at once

LOADING_COLUMNS = ["target", "source", "layer", "head", "weight", "query_pos", "key_pos", "pair_share"]


def graph_targets(lrm: LocalReplacementModel, graph: AttributionGraph, nodes: torch.Tensor) -> TargetSet:
    """Readouts of graph nodes `nodes` (features or logits, graph node indices)."""
    n_logit = graph.logit_start
    is_logit = nodes >= n_logit
    features = feature_targets(lrm, graph.selected[nodes[~is_logit]])
    logits = logit_targets(lrm).subset(nodes[is_logit] - n_logit)
    return TargetSet(torch.cat([features.layer, logits.layer]), torch.cat([features.pos, logits.pos]),
                     torch.cat([features.readout, logits.readout]))


def head_side_gradients(lrm: LocalReplacementModel, targets: TargetSet) -> list[torch.Tensor]:
    """z_j = (d readout / d resid_mid[j]) @ W_O[j] for every layer j.  -> per layer [T, P, H*dh]"""
    weights, frozen = lrm.model, lrm.prompt
    grad = torch.zeros(len(targets), lrm.n_pos, weights.d_model)
    rows = torch.arange(len(targets))
    z = [torch.empty(0)] * lrm.n_layers
    for level in reversed(range(lrm.n_layers + 1)):
        new = targets.layer == level
        grad[rows[new], targets.pos[new]] += targets.readout[new]
        if level == lrm.n_layers:
            continue
        z[level] = grad @ weights.W_O[level]
        grad = grad + attention_vjp(grad, frozen.patterns[level], weights.W_O[level],
                                    weights.W_V[level] * weights.attn_norm[level], frozen.attn_inv_rms[level],
                                    weights.n_kv_heads)
    return z


class SourceWrites:
    """What source nodes write, layer by layer, added into a residual effect [S, P, d] as a forward
    sweep passes: tokens before layer 0, features into MLP-outs l_s.., errors into their layer."""

    def __init__(self, lrm: LocalReplacementModel, graph: AttributionGraph, sources: torch.Tensor):
        self.lrm = lrm
        rows = torch.arange(len(sources))
        is_feature, is_token = sources < graph.error_start, sources >= graph.token_start
        is_error = ~is_feature & ~is_token
        feats = graph.active_features[graph.selected[sources[is_feature]]]  # [n, 3]
        self.feature_rows, self.feature_layer, self.feature_pos, self.feature_id = rows[is_feature], *feats.unbind(1)
        self.feature_act = graph.activations[graph.selected[sources[is_feature]]]
        error = sources[is_error] - graph.error_start
        self.error_rows, self.error_layer, self.error_pos = rows[is_error], error // graph.n_pos, error % graph.n_pos
        self.token_rows, self.token_pos = rows[is_token], sources[is_token] - graph.token_start
        self.token_ids = graph.tokens[self.token_pos]

    def embedded(self, n_sources: int) -> torch.Tensor:
        """The residual effect entering layer 0.  -> [S, P, d]"""
        lrm = self.lrm
        resid = torch.zeros(n_sources, lrm.n_pos, lrm.model.d_model)
        resid[self.token_rows, self.token_pos] = lrm.model.embed[self.token_ids]
        return resid

    def add_mlp_writes(self, resid: torch.Tensor, layer: int) -> None:
        """Add what the sources write into MLP-out `layer` (in place)."""
        live = self.feature_layer <= layer
        for source_layer in self.feature_layer[live].unique().tolist():
            mask = self.feature_layer == source_layer
            vectors = self.lrm.clt.W_dec[source_layer][self.feature_id[mask], layer - source_layer]
            resid[self.feature_rows[mask], self.feature_pos[mask]] += vectors * self.feature_act[mask, None]
        here = self.error_layer == layer
        resid[self.error_rows[here], self.error_pos[here]] += self.lrm.errors[layer, self.error_pos[here]]


def head_outputs(lrm: LocalReplacementModel, layer: int, resid: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen attention of `layer` applied to residual effects [S, P, d]: (values [S, P, Kv, dh], per-head
    outputs before W_O [S, P, H, dh])."""
    weights, frozen = lrm.model, lrm.prompt
    n_heads, n_kv = weights.n_heads, weights.n_kv_heads
    normed = resid * frozen.attn_inv_rms[layer][:, None] * weights.attn_norm[layer]
    values = (normed @ weights.W_V[layer].T).unflatten(-1, (n_kv, -1))  # [S, P, Kv, dh]
    expanded = values.repeat_interleave(n_heads // n_kv, dim=2)  # [S, P, H, dh]
    return values, torch.einsum("hqk,skhe->sqhe", frozen.patterns[layer], expanded)


def write_layer(graph: AttributionGraph, node: int) -> int:
    """The first layer a source writes into (-1: the embedding, before layer 0)."""
    if node < graph.error_start:
        return int(graph.active_features[graph.selected[node], 0])
    if node < graph.token_start:
        return (node - graph.error_start) // graph.n_pos
    return -1


def read_layer(graph: AttributionGraph, node: int) -> int:
    """The layer whose resid_mid a target reads (n_layers: the final residual)."""
    if node >= graph.logit_start:
        return graph.n_layers
    return int(graph.active_features[graph.selected[node], 0])


def head_loadings(lrm: LocalReplacementModel, graph: AttributionGraph, targets: torch.Tensor,
                  sources: torch.Tensor, config: AttentionAttributionConfig, chunk: int = 64) -> pd.DataFrame:
    """Head loadings of the edges (targets[i] <- sources[i]) (graph node indices), one row per stored
    part: per carrying layer, the heads holding >= head_min_share of |edge| (with their main (query,
    key) pair), the rest of the heads (head -2) and the skip part (head -1)."""
    frames = []
    weight = graph.adjacency[targets, sources]
    crosses = torch.tensor([write_layer(graph, s) < min(read_layer(graph, t), graph.n_layers)
                            for t, s in zip(targets.tolist(), sources.tolist())], dtype=torch.bool)
    keep = crosses & (weight != 0)
    targets, sources, weight = targets[keep], sources[keep], weight[keep]
    unique_targets = torch.unique(targets)
    for start in range(0, len(unique_targets), chunk):
        chunk_targets = unique_targets[start:start + chunk]
        in_chunk = torch.isin(targets, chunk_targets)
        frames.append(_chunk_loadings(lrm, graph, chunk_targets, targets[in_chunk], sources[in_chunk],
                                      weight[in_chunk], config))
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="int32" if c not in ("weight", "pair_share") else "float32")
                             for c in LOADING_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def _chunk_loadings(lrm: LocalReplacementModel, graph: AttributionGraph, chunk_targets: torch.Tensor,
                    targets: torch.Tensor, sources: torch.Tensor, weight: torch.Tensor,
                    config: AttentionAttributionConfig) -> pd.DataFrame:
    """Head loadings of the edges into one chunk of targets: one backward and one forward sweep."""
    z = head_side_gradients(lrm, graph_targets(lrm, graph, chunk_targets))
    unique_sources, source_row = torch.unique(sources, return_inverse=True)
    target_row = torch.searchsorted(chunk_targets, targets)
    first = torch.tensor([write_layer(graph, s) for s in sources.tolist()]) + 1  # first layer crossed
    last = torch.tensor([min(read_layer(graph, t), graph.n_layers - 1) for t in targets.tolist()])
    writes = SourceWrites(lrm, graph, unique_sources)
    resid = writes.embedded(len(unique_sources))
    n_heads = lrm.model.n_heads
    rows = []
    for layer in range(int(last.max()) + 1):  # no edge crosses a higher layer
        values, heads_out = head_outputs(lrm, layer, resid)  # [S, P, Kv, dh], [S, P, H, dh]
        for edges in ((first <= layer) & (layer <= last)).nonzero().flatten().split(EDGE_SLICE):
            z_t = z[layer][target_row[edges]].unflatten(-1, (n_heads, -1))  # [E, P, H, dh]
            parts = (z_t * heads_out[source_row[edges]]).sum((1, 3))  # [E, H]
            rows.append(_layer_rows(lrm, layer, edges, parts, weight, z_t, values[source_row[edges]], config))
        resid = resid + heads_out.flatten(2) @ lrm.model.W_O[layer].T
        writes.add_mlp_writes(resid, layer)
    rows = [r for r in rows if r is not None]
    if not rows:
        return pd.DataFrame(columns=LOADING_COLUMNS)
    frame = pd.concat(rows, ignore_index=True)
    edge = torch.tensor(frame.pop("edge").to_numpy())
    frame["target"], frame["source"] = targets[edge].numpy(), sources[edge].numpy()
    return frame[LOADING_COLUMNS]


def _layer_rows(lrm: LocalReplacementModel, layer: int, edges: torch.Tensor, parts: torch.Tensor,
                weight: torch.Tensor, z_t: torch.Tensor, values: torch.Tensor,
                config: AttentionAttributionConfig) -> pd.DataFrame | None:
    """Rows for the edges this layer carries: big heads (with their main pair), other heads, skip."""
    edge_weight = weight[edges]
    scale = edge_weight.abs()
    carried = parts.abs().sum(1) >= config.layer_min_share * scale
    if not carried.any():
        return None
    edges, parts, edge_weight, scale = edges[carried], parts[carried], edge_weight[carried], scale[carried]
    z_t, values = z_t[carried], values[carried]
    big = parts.abs() >= config.head_min_share * scale[:, None]  # [E, H]
    record = {"edge": [], "layer": [], "head": [], "weight": [], "query_pos": [], "key_pos": [], "pair_share": []}

    def add(edge_rows, heads, values_, query, key, share):
        record["edge"] += edge_rows.tolist()
        record["head"] += heads.tolist()
        record["weight"] += values_.tolist()
        record["query_pos"] += query.tolist()
        record["key_pos"] += key.tolist()
        record["pair_share"] += share.tolist()
        record["layer"] += [layer] * len(edge_rows)

    edge_index, head = big.nonzero().unbind(1)
    if len(edge_index):
        group = lrm.model.n_heads // lrm.model.n_kv_heads
        pattern = lrm.prompt.patterns[layer][head]  # [B, P, P]
        pair = pattern * torch.einsum("bqe,bke->bqk", z_t[edge_index, :, head], values[edge_index, :, head // group])
        flat = pair.flatten(1).abs().argmax(1)
        query, key = flat // lrm.n_pos, flat % lrm.n_pos
        share = pair.flatten(1)[torch.arange(len(flat)), flat] / parts[edge_index, head]
        add(edges[edge_index], head, parts[edge_index, head], query, key, share)
    other = (parts * ~big).sum(1)
    has_other = (~big).any(1) & (other != 0)
    n_other = int(has_other.sum())
    add(edges[has_other], torch.full((n_other,), OTHER_HEADS), other[has_other],
        torch.full((n_other,), -1), torch.full((n_other,), -1), torch.full((n_other,), float("nan")))
    skip = edge_weight - parts.sum(1)
    add(edges, torch.full((len(edges),), SKIP_HEAD), skip, torch.full((len(edges),), -1),
        torch.full((len(edges),), -1), torch.full((len(edges),), float("nan")))
    return pd.DataFrame(record)
