"""QK attribution: why an attention edge is open, as a sum over pairs of residual components.

The residual entering layer j at position p is a sum of components: the token embedding; each active
feature f at p with source layer < j (its writes into MLP-outs l_f..j-1); the error nodes of layers
< j; the constants (decoder biases, or the whole MLP output at the BOS position); and every earlier
head's attention output. With the frozen norm scale and the rotary rotation (both linear), the query
and the key are sums of per-component vectors, so the gate logit of (j, h, q, k) is exactly

    score + b = sum over (query component c, key component c') of q_c . k_c' / sqrt(d_head)  +  b.

Stored per attention edge: the top pairs and the rest (they sum with b to the logit), and each side's
marginals (a component's total with every partner) with their rest.
"""

from __future__ import annotations

from functools import cache

import pandas as pd
import torch

from attribution.config import AttentionAttributionConfig
from attribution.nodes import LocalReplacementModel

QK_COLUMNS = ["layer", "head", "query_pos", "key_pos", "kind", "query_component", "key_component", "value",
              "gate_logit"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary pairing of Llama: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation of one position.  x [..., dh]; cos, sin [dh]"""
    return x * cos + rotate_half(x) * sin


def frozen_head_outputs(lrm: LocalReplacementModel) -> torch.Tensor:
    """Every head's attention output in the real forward pass.  -> [L, H, P, d]"""
    weights, frozen = lrm.model, lrm.prompt
    n_heads, n_kv = weights.n_heads, weights.n_kv_heads
    out = []
    for layer in range(lrm.n_layers):
        normed = frozen.resid_pre[layer] * frozen.attn_inv_rms[layer][:, None] * weights.attn_norm[layer]
        values = (normed @ weights.W_V[layer].T).unflatten(-1, (n_kv, -1))  # [P, Kv, dh]
        values = values.repeat_interleave(n_heads // n_kv, dim=1)  # [P, H, dh]
        mixed = torch.einsum("hqk,khe->hqe", frozen.patterns[layer], values)  # [H, P, dh]
        W_O = weights.W_O[layer].unflatten(1, (n_heads, -1))  # [d, H, dh]
        out.append(torch.einsum("hqe,dhe->hqd", mixed, W_O))
    return torch.stack(out)


class ResidualComponents:
    """The named parts of resid_pre[layer][pos] (see the module docstring), cached per (layer, pos)."""

    def __init__(self, lrm: LocalReplacementModel):
        self.lrm = lrm
        self.heads = frozen_head_outputs(lrm)  # [L, H, P, d]
        self.at = cache(self._components)
        self._projected: dict[tuple, tuple[list[str], torch.Tensor]] = {}

    def _components(self, layer: int, pos: int) -> tuple[list[str], torch.Tensor]:
        lrm = self.lrm
        token = int(lrm.prompt.tokens[pos])
        ids, vectors = [f"E_{token}_{pos}"], [lrm.model.embed[token][None]]
        features = ((lrm.features[:, 1] == pos) & (lrm.features[:, 0] < layer)).nonzero().flatten()
        source, feat = lrm.features[features, 0], lrm.features[features, 2]
        writes = torch.zeros(len(features), lrm.model.d_model)
        for src in source.unique().tolist():  # a feature's writes into MLP-outs src..layer-1
            mask = source == src
            writes[mask] = lrm.clt.W_dec[src][feat[mask], :layer - src].sum(1)
        ids += [f"{s}_{f}_{pos}" for s, f in zip(source.tolist(), feat.tolist())]
        vectors.append(writes * lrm.activations[features, None])
        if pos > 0:
            ids += [f"{k}_-1_{pos}" for k in range(layer)]
            vectors.append(lrm.errors[:layer, pos])
        ids.append(f"bias_{pos}")
        vectors.append(lrm.constants[:layer, pos].sum(0)[None])
        n_heads = lrm.model.n_heads
        ids += [f"attn_{k}_{h}_{pos}" for k in range(layer) for h in range(n_heads)]
        vectors.append(self.heads[:layer, :, pos].reshape(-1, lrm.model.d_model))
        return ids, torch.cat(vectors)

    def projected(self, layer: int, pos: int, side: str, head: int) -> tuple[list[str], torch.Tensor]:
        """Each component through the frozen input norm, head `head`'s query projection (side "q") or
        key projection (side "k", `head` a kv head) and the rotation at pos.  -> (ids, [n, dh])"""
        key = (layer, pos, side, head)
        if key not in self._projected:
            ids, vectors = self.at(layer, pos)
            lrm, dh = self.lrm, self.lrm.model.head_dim
            W = (lrm.model.W_Q if side == "q" else lrm.model.W_K)[layer][head * dh:(head + 1) * dh]
            normed = vectors * (lrm.model.attn_norm[layer] * lrm.prompt.attn_inv_rms[layer, pos])
            self._projected[key] = ids, rotary(normed @ W.T, lrm.prompt.rope_cos[pos], lrm.prompt.rope_sin[pos])
        return self._projected[key]


def qk_pair_contributions(components: ResidualComponents, layer: int, head: int, query_pos: int,
                          key_pos: int) -> tuple[list[str], list[str], torch.Tensor]:
    """Every (query component, key component) contribution to the score of (layer, head, q, k).
    -> (query ids, key ids, contributions [n_q, n_k]); they sum to the score s = q.k / sqrt(dh)."""
    weights = components.lrm.model
    kv = head // (weights.n_heads // weights.n_kv_heads)
    query_ids, queries = components.projected(layer, query_pos, "q", head)
    key_ids, keys = components.projected(layer, key_pos, "k", kv)
    return query_ids, key_ids, (queries @ keys.T) * weights.head_dim**-0.5


def qk_rows(components: ResidualComponents, layer: int, head: int, query_pos: int, key_pos: int,
            config: AttentionAttributionConfig) -> list[tuple]:
    """The stored QK attribution of one attention edge (see the module docstring), as QK_COLUMNS tuples."""
    query_ids, key_ids, pairs = qk_pair_contributions(components, layer, head, query_pos, key_pos)
    offsets = components.lrm.model.gate_offsets
    offset = float(offsets[layer, head]) if offsets is not None else 0.0
    score = float(pairs.double().sum())
    logit = score + offset
    rows = []

    def add(kind, query, key, value):
        rows.append((layer, head, query_pos, key_pos, kind, query, key, float(value), logit))

    top = pairs.flatten().abs().topk(min(config.qk_top_pairs, pairs.numel())).indices
    for flat, value in zip(top.tolist(), pairs.flatten()[top].tolist()):
        q, k = divmod(flat, pairs.shape[1])
        add("pair", query_ids[q], key_ids[k], value)
    add("pair_rest", "*", "*", score - float(pairs.flatten()[top].double().sum()))
    add("offset", "b", "b", offset)
    for side, ids, marginal in (("query", query_ids, pairs.double().sum(1)), ("key", key_ids, pairs.double().sum(0))):
        top = marginal.abs().topk(min(config.qk_top_marginals, len(marginal))).indices
        for index, value in zip(top.tolist(), marginal[top].tolist()):
            add(f"{side}_marginal", ids[index] if side == "query" else "*", ids[index] if side == "key" else "*",
                value)
        add(f"{side}_marginal_rest", "*", "*", score - float(marginal[top].sum()))
    return rows


def attention_edges(loadings: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The distinct (layer, head, query_pos, key_pos) that head loadings point at, the `limit` with the
    largest |part| first."""
    heads = loadings[loadings["head"] >= 0].assign(size=lambda f: f["weight"].abs())
    keys = ["layer", "head", "query_pos", "key_pos"]
    ranked = heads.groupby(keys, as_index=False)["size"].max().sort_values("size", ascending=False, kind="stable")
    return ranked[keys].head(limit).reset_index(drop=True)


def qk_attribution(lrm: LocalReplacementModel, loadings: pd.DataFrame, config: AttentionAttributionConfig
                   ) -> pd.DataFrame:
    """QK attribution of every attention edge that carries a stored head loading (up to the limit)."""
    edges = attention_edges(loadings, config.max_attention_edges)
    if not len(edges):
        return pd.DataFrame(columns=QK_COLUMNS)
    components = ResidualComponents(lrm)
    rows = [row for edge in edges.itertuples(index=False) for row in qk_rows(components, *map(int, edge), config)]
    return pd.DataFrame(rows, columns=QK_COLUMNS)
