"""QK attribution: why an attention edge is open, as a sum over pairs of residual components.

The residual entering layer j at position p is a sum of components: the token embedding; each active
feature f at p with source layer < j (its writes into MLP-outs l_f..j-1); the error nodes of layers
< j; the constants (decoder biases, or the whole MLP output at the BOS position; learned position
embeddings and output-projection biases where the family has them); and every earlier head's attention
output (value biases included). With the frozen norm scales (the input norm, and the norms on queries and keys
where the family has them) and the rotary rotation (all linear), and the projection's bias as one more
component where it has one, the query and the key are sums of per-component vectors, so the gate logit
of (j, h, q, k) is exactly

    score + b = sum over (query component c, key component c') of q_c . k_c' * scaling  +  b

(scaling: the attention's own, 1/sqrt(d_head) or Gemma's query_pre_attn_scalar^-1/2). With an attention
soft-cap (Gemma-2) the pairs split the pre-cap score s and the gate logit is cap * tanh(s / cap) + b: the
stored `gate_logit` is that capped logit, and the cap is in the graph's `attn_logit_softcap`, so
pairs + pair_rest = s, and cap * tanh(s / cap) + offset = gate_logit.

With a CLT skip path each MLP output (at positions > 0) also holds W_skip applied to its frozen-scale input,
a linear map of resid_mid at the same position; so each component's vector is what it puts into resid_pre[j]
directly and through the skips of the layers between (`carry_up`), and the components still sum
to the residual.

Stored per attention edge: the top pairs and the rest (they sum with b to the logit, before any cap), and each side's
marginals (a component's total with every partner) with their rest.

The edges are attributed layer by layer: the components of every position a layer's edges need are
projected through the heads those edges use (one product per head, so the numbers do not depend on which
positions and heads are chunked together), and the pair grids of many edges are formed in one batched
matmul; `QKChunks` bounds how many positions and grids are held at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from attribution.budget import FLOAT_BYTES, MemoryBudgetError, default_budget_bytes
from attribution.config import AttentionAttributionConfig
from attribution.nodes import LocalReplacementModel
from attribution.propagate import skip_forward
from attribution.replacement import capped

QK_COLUMNS = ["layer", "head", "query_pos", "key_pos", "kind", "query_component", "key_component", "value",
              "gate_logit"]
EDGE_KEYS = ["layer", "head", "query_pos", "key_pos"]
QK_ROW_BYTES = 400  # an output row while the rows are gathered, concatenated and sorted (measured: ~320)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary pairing of Llama: (x1, x2) -> (-x2, x1) over the two halves of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply the rotation of one position (cos, sin [dh]) or of each row (cos, sin broadcast to x).  x [..., dh]"""
    return x * cos + rotate_half(x) * sin


def frozen_head_mixes(lrm: LocalReplacementModel) -> torch.Tensor:
    """Every head's attention output before W_O in the real forward pass.  -> [L, P, H, dh]"""
    weights, frozen = lrm.model, lrm.prompt
    n_kv = weights.n_kv_heads
    out = []
    for layer in range(lrm.n_layers):
        normed = frozen.resid_pre[layer] * frozen.attn_inv_rms[layer][:, None] * weights.attn_norm[layer]
        values = normed @ weights.W_V[layer].T
        if weights.b_V is not None:
            values = values + weights.b_V[layer]
        values = values.unflatten(-1, (n_kv, -1))  # [P, Kv, dh]
        pattern = frozen.patterns[layer].unflatten(0, (n_kv, -1))  # [Kv, G, P, P]
        out.append(torch.einsum("cgqk,kce->qcge", pattern, values).flatten(1, 2))  # [P, H, dh]
    return torch.stack(out)


@dataclass(frozen=True)
class QKChunks:
    """How much of the QK attribution is held at once."""

    positions: int  # (layer, position) component sets projected together
    edges: int  # attention edges whose pair grids are formed together
    cached_positions: int  # positions whose earlier heads' outputs are kept for later layers


def qk_chunk_bytes(chunks: QKChunks, n_components: int, lrm: LocalReplacementModel) -> int:
    """Peak bytes of QK attribution with `chunks`, `n_components` at most per (layer, position).

    Each cached position holds its PositionParts at one layer: the heads' outputs [L * H, d] and the features'
    decoder sums [n_f, d] (n_f: the most active features at one position, over all layers), with a skip path
    the carried components [n_components, d] instead; one more position is held while the least recently used
    is evicted, and moving one up a layer holds the features' writes [n_f, d] (with a skip path, the layer's
    components three times more: a copy, its skip output and their sum). Fixed: the heads' mixes
    [L, P, H, dh] and W_O [L, H, dh, d]."""
    d, L, H, dh = lrm.model.d_model, lrm.n_layers, lrm.model.n_heads, lrm.model.head_dim
    n_f = features_per_position(lrm)
    slots = max(d, H * dh)  # a projected component: a row per head of dh
    positions = chunks.positions * n_components * (2 * d + 3 * slots)  # components, normed; projected, rotated, padded
    grids = chunks.edges * n_components * (n_components * 4 + 2 * dh)  # grid, |grid|, double
    cached = L * H * d + (n_components if lrm.has_skip else n_f) * d
    moving = n_f * d + (3 * n_components * d if lrm.has_skip else 0)
    cache = (chunks.cached_positions + 1) * cached + moving
    fixed = L * lrm.n_pos * H * dh + L * H * dh * d + L * lrm.n_pos * d
    return (positions + grids + cache + fixed) * FLOAT_BYTES


def qk_output_bytes(n_edges: int, config: AttentionAttributionConfig) -> int:
    """Bytes of the QK rows of `n_edges` edges (at most: top pairs, top marginals per side, and four rests)."""
    return n_edges * (config.qk_top_pairs + 2 * config.qk_top_marginals + 4) * QK_ROW_BYTES


def plan_qk_chunks(lrm: LocalReplacementModel, n_edges: int, budget_bytes: int, output_bytes: int = 0) -> QKChunks:
    """The largest chunks that fit `budget_bytes` beside `output_bytes` (the rows, `qk_output_bytes`):
    positions and the position cache get a third each, grids the rest; no more positions projected together
    than are cached, so none is built twice in a group. MemoryBudgetError if one of each does not fit."""
    n_components = max_components(lrm)
    least = qk_chunk_bytes(QKChunks(2, 1, 1), n_components, lrm)
    needed = least + output_bytes
    if needed > budget_bytes:
        raise MemoryBudgetError(
            f"QK attribution of a {lrm.n_pos}-position prompt needs at least {needed / 2**30:.2f} GiB, over the "
            f"memory budget of {budget_bytes / 2**30:.2f} GiB; raise memory_budget_gb or shorten the prompt"
        )
    spare = budget_bytes - needed
    per_position = qk_chunk_bytes(QKChunks(3, 1, 1), n_components, lrm) - least
    per_cached = qk_chunk_bytes(QKChunks(2, 1, 2), n_components, lrm) - least
    per_edge = qk_chunk_bytes(QKChunks(2, 2, 1), n_components, lrm) - least
    cached = min(lrm.n_pos, 1 + spare // 3 // per_cached)
    positions = min(2 * n_edges, 2 + spare // 3 // per_position, max(2, cached))
    edges = min(n_edges, 1 + (spare - (positions - 2) * per_position - (cached - 1) * per_cached) // per_edge)
    return QKChunks(int(max(2, positions)), int(max(1, edges)), int(max(1, cached)))


def features_per_position(lrm: LocalReplacementModel) -> int:
    """The most active features at any one position (over all source layers)."""
    return int(torch.bincount(lrm.features[:, 1], minlength=1).max()) if lrm.n_active else 0


def max_components(lrm: LocalReplacementModel) -> int:
    """The most components any (layer, position) has: token, features, errors, constants, heads."""
    return 3 + features_per_position(lrm) + lrm.n_layers + lrm.n_layers * lrm.model.n_heads  # + the projection's bias


@dataclass
class PositionParts:
    """What the components of resid_pre[layer][pos] are cut from, at one layer (`layer`): `ResidualComponents`
    moves it up a layer at a time in place, so a position holds one layer's vectors, not every layer's."""

    feature_ids: list[str]  # active features at the position, by source layer
    feature_layer: torch.Tensor  # [n_f] their source layers, ascending
    feature_index: torch.Tensor  # [n_f] their indices in their source layer's decoder
    feature_activations: torch.Tensor  # [n_f]
    feature_sources: list[tuple[int, int, int]]  # (source layer, first row, end row) in the rows above
    error_ids: list[str]  # per layer k: `{k}_-1_{pos}`
    head_ids: list[str]  # per (layer k, head h), layer-major: `attn_{k}_{h}_{pos}`
    head_outputs: torch.Tensor  # [L * H, d] each head's attention output
    id_array: np.ndarray  # every component id of the position (object): token, features, errors, bias, heads, q and k biases
    layer: int = 0
    decoder_sums: torch.Tensor | None = None  # [n_f, d] each feature's decoder rows into MLP-outs below `layer`
    carried: torch.Tensor | None = None  # with a skip path at a position > 0: [2 + n_f + L + L * H, d] (see carry_up)


def mlp_writes(lrm: LocalReplacementModel, parts: PositionParts, layer: int, scaled: bool) -> torch.Tensor:
    """Each feature's decoder row into MLP-out `layer` (zero for features of later source layers), times its
    activation where `scaled`.  -> [n_f, d]"""
    out = torch.zeros(len(parts.feature_ids), lrm.model.d_model)
    for source, first, end in parts.feature_sources:
        if source > layer:
            break
        out[first:end] = lrm.clt.W_dec[source][parts.feature_index[first:end], layer - source]
        if scaled:
            out[first:end] *= parts.feature_activations[first:end, None]
    return out


def carry_up(lrm: LocalReplacementModel, pos: int, layer: int, carried: torch.Tensor, head_outputs: torch.Tensor,
             writes: torch.Tensor) -> None:
    """Move position `pos`'s components through layer `layer` in place: carried [c] is component c's vector in
    resid_pre[layer] on entry and in resid_pre[layer + 1] on return, through the layer's heads and its CLT skip
    path. Rows: token, features, errors (per layer), bias, heads (layer-major); head_outputs [L * H, d], writes
    [n_f, d] the features' writes into MLP-out `layer` (mlp_writes, scaled).  carried [2 + n_f + L + L * H, d]"""
    L, H = lrm.n_layers, lrm.model.n_heads
    n_f = len(writes)
    errors, bias, heads = 1 + n_f, 1 + n_f + L, 2 + n_f + L
    live = heads + (layer + 1) * H  # heads of later layers are still zero
    mid = carried[:live].clone()
    mid[heads + layer * H:live] += head_outputs[layer * H:(layer + 1) * H]
    scale = lrm.skip_input_scale(layer)[pos].expand(live)  # one position: the same frozen scale on every row
    post = mid + skip_forward(mid, lrm.clt.W_skip[layer], lrm.model.mlp_norm[layer], scale)
    post[1:errors] += writes
    post[errors + layer] += lrm.errors[layer, pos]
    post[bias] += lrm.constants[layer, pos]
    carried[:live] = post


class ResidualComponents:
    """The named parts of resid_pre[layer][pos] (see the module docstring), and their projections.
    What they are cut from is kept per position, for the `cached_positions` used last, at the layer asked
    for last: asked for a later layer, a position moves up in place; for an earlier one, it is rebuilt."""

    def __init__(self, lrm: LocalReplacementModel, cached_positions: int | None = None):
        self.lrm = lrm
        weights = lrm.model
        self.mixes = frozen_head_mixes(lrm)  # [L, P, H, dh]
        self.W_O = weights.W_O.unflatten(2, (weights.n_heads, -1)).permute(0, 2, 3, 1).contiguous()  # [L, H, dh, d]
        self.cached_positions = cached_positions or lrm.n_pos
        self._parts: OrderedDict[int, PositionParts] = OrderedDict()  # least recently used first

    def parts(self, pos: int, layer: int | None = None) -> PositionParts:
        """The position's PositionParts (cached), moved to `layer` where given."""
        if pos in self._parts:
            self._parts.move_to_end(pos)
            parts = self._parts[pos]
            if layer is not None and layer < parts.layer:
                parts = self._parts[pos] = self._build(pos)
        else:
            parts = self._parts[pos] = self._build(pos)
            if len(self._parts) > self.cached_positions:
                self._parts.popitem(last=False)
        while layer is not None and parts.layer < layer:
            self._advance(pos, parts)
        return parts

    def _build(self, pos: int) -> PositionParts:
        """A position's PositionParts at layer 0 (the token alone)."""
        lrm = self.lrm
        L, d, n_heads = lrm.n_layers, lrm.model.d_model, lrm.model.n_heads
        index = (lrm.features[:, 1] == pos).nonzero().flatten()  # (layer, feature) order
        source, feat = lrm.features[index, 0], lrm.features[index, 2]
        sources, counts = source.unique_consecutive(return_counts=True)
        ends = counts.cumsum(0).tolist()
        head_outputs = torch.einsum("lhe,lhed->lhd", self.mixes[:, pos], self.W_O).reshape(-1, d)
        feature_ids = [f"{s}_{f}_{pos}" for s, f in zip(source.tolist(), feat.tolist())]
        error_ids = [f"{k}_-1_{pos}" for k in range(L)]
        head_ids = [f"attn_{k}_{h}_{pos}" for k in range(L) for h in range(n_heads)]
        id_array = np.array([f"E_{int(lrm.prompt.tokens[pos])}_{pos}", *feature_ids, *error_ids, f"bias_{pos}",
                             *head_ids, f"q_bias_{pos}", f"k_bias_{pos}"], dtype=object)
        carried = None
        if lrm.has_skip and pos > 0:
            carried = torch.zeros(2 + len(index) + L + L * n_heads, d)
            carried[0] = lrm.model.embed[lrm.prompt.tokens[pos]]
        return PositionParts(
            feature_ids=feature_ids,
            feature_layer=source,
            feature_index=feat,
            feature_activations=lrm.activations[index],
            feature_sources=[(int(s), end - int(n), end) for s, n, end in zip(sources, counts, ends)],
            error_ids=error_ids,
            head_ids=head_ids,
            head_outputs=head_outputs,
            id_array=id_array,
            decoder_sums=None if carried is not None else torch.zeros(len(index), d),
            carried=carried,
        )

    def _advance(self, pos: int, parts: PositionParts) -> None:
        """Move `parts` up one layer, in place."""
        if parts.carried is not None:
            carry_up(self.lrm, pos, parts.layer, parts.carried, parts.head_outputs,
                     mlp_writes(self.lrm, parts, parts.layer, scaled=True))
        else:
            parts.decoder_sums += mlp_writes(self.lrm, parts, parts.layer, scaled=False)
        parts.layer += 1

    def ids(self, layer: int, pos: int) -> list[str]:
        """The ids of the components of resid_pre[layer][pos], in their order."""
        return self.id_array(layer, pos).tolist()

    def id_array(self, layer: int, pos: int, side: str | None = None) -> np.ndarray:
        """`ids` as an object array, with the `side` projection's bias id last where given."""
        parts = self.parts(pos)
        n_features, n_errors, n_heads = self._counts(layer, pos)
        errors = 1 + len(parts.feature_ids)
        heads = errors + self.lrm.n_layers + 1
        rows = np.r_[0:1 + n_features, errors:errors + n_errors, heads - 1:heads + n_heads]
        if side is not None:
            rows = np.append(rows, heads + len(parts.head_ids) + (side == "k"))
        return parts.id_array[rows]

    def at(self, layer: int, pos: int) -> tuple[list[str], torch.Tensor]:
        """The components of resid_pre[layer][pos].  -> (ids, vectors [n, d]); the vectors sum to it."""
        ids = self.ids(layer, pos)
        vectors = torch.empty(len(ids), self.lrm.model.d_model)
        self._fill(layer, pos, vectors)
        return ids, vectors

    def position_constant(self, layer: int, pos: int) -> torch.Tensor:
        """The constants of resid_pre[layer][pos] that are not MLP-outs: a learned position embedding and the
        output biases of earlier attention layers (GPT-2); value biases are inside the heads' outputs.  -> [d]"""
        weights = self.lrm.model
        out = torch.zeros(weights.d_model)
        if weights.pos_embed is not None:
            out += weights.pos_embed[pos]
        if weights.b_O is not None:
            out += weights.b_O[:layer].sum(0)
        return out

    def _counts(self, layer: int, pos: int) -> tuple[int, int, int]:
        """How many features (a prefix: sorted by source layer), errors and heads resid_pre[layer][pos] holds."""
        return (int((self.parts(pos).feature_layer < layer).sum()), layer if pos > 0 else 0,
                layer * self.lrm.model.n_heads)

    def _fill(self, layer: int, pos: int, out: torch.Tensor) -> None:
        """Write the component vectors of resid_pre[layer][pos] into out[:n] (in place)."""
        lrm, parts = self.lrm, self.parts(pos, layer)
        n_features, n_errors, n_heads = self._counts(layer, pos)
        if parts.carried is not None:
            errors = 1 + len(parts.feature_ids)
            heads = errors + lrm.n_layers + 1
            rows = torch.cat([torch.arange(1 + n_features),
                              torch.arange(errors, errors + n_errors), torch.tensor([heads - 1]),
                              torch.arange(heads, heads + n_heads)])
            out[:len(rows)] = parts.carried[rows]
            return
        out[0] = lrm.model.embed[lrm.prompt.tokens[pos]]
        torch.mul(parts.decoder_sums[:n_features], parts.feature_activations[:n_features, None],
                  out=out[1:1 + n_features])
        at = 1 + n_features
        out[at:at + n_errors] = lrm.errors[:n_errors, pos]
        out[at + n_errors] = lrm.constants[:layer, pos].sum(0) + self.position_constant(layer, pos)
        out[at + n_errors + 1:at + n_errors + 1 + n_heads] = parts.head_outputs[:n_heads]

    def projected(self, layer: int, positions: list[int], side: str, heads: list[list[int]] | None = None
                  ) -> tuple[list[np.ndarray], torch.Tensor]:
        """The components of each position through the frozen input norm, the query projection of each
        head (side "q") or the key projection of each kv head (side "k") - plus the projection's bias as
        one more component, `{side}_bias_{pos}`, where it has one - then the frozen norm on queries / keys
        and the rotation of that position, padded with zero rows. Slot i holds head i; with `heads`, slot i of
        position row holds head heads[row][i] (the slots beyond stay zero).
        -> (ids per position (object arrays), [n_positions, n_max, slots, dh])"""
        lrm, dh = self.lrm, self.lrm.model.head_dim
        weights, frozen = lrm.model, lrm.prompt
        W, bias, gain, scale = ((weights.W_Q, weights.b_Q, weights.q_norm, frozen.q_inv_rms) if side == "q" else
                                (weights.W_K, weights.b_K, weights.k_norm, frozen.k_inv_rms))
        W = W[layer].unflatten(0, (-1, dh))  # [heads, dh, d]
        ids = [self.id_array(layer, pos, None if bias is None else side) for pos in positions]
        vectors = torch.empty(max(map(len, ids)), lrm.model.d_model)
        out = torch.zeros(len(positions), len(vectors), len(W) if heads is None else max(map(len, heads)), dh)
        for row, pos in enumerate(positions):
            chosen = list(range(len(W))) if heads is None else heads[row]
            n = len(ids[row]) - (bias is not None)
            self._fill(layer, pos, vectors)
            normed = vectors[:n] * (weights.attn_norm[layer] * frozen.attn_inv_rms[layer, pos])
            projected = torch.empty(len(chosen), n, dh)  # one product per head: the same whichever are chosen
            for slot, head in enumerate(chosen):
                torch.mm(normed, W[head].T, out=projected[slot])
            projected = projected.transpose(0, 1)  # [n, chosen, dh]
            if bias is not None:
                projected = torch.cat([projected, bias[layer].view(-1, dh)[chosen][None]])
            if gain is not None:
                projected = projected * (gain[layer].view(-1, dh)[chosen] * scale[layer, pos, chosen][:, None])
            out[row, :len(projected), :len(chosen)] = rotary(projected, frozen.rope_cos[layer, pos], frozen.rope_sin[layer, pos])
        return ids, out


def qk_pair_contributions(components: ResidualComponents, layer: int, head: int, query_pos: int,
                          key_pos: int) -> tuple[list[str], list[str], torch.Tensor]:
    """Every (query component, key component) contribution to the score of (layer, head, q, k).
    -> (query ids, key ids, contributions [n_q, n_k]); they sum to the score s = q.k * scaling."""
    weights = components.lrm.model
    kv = head // (weights.n_heads // weights.n_kv_heads)
    (query_ids,), queries = components.projected(layer, [query_pos], "q")
    (key_ids,), keys = components.projected(layer, [key_pos], "k")
    return query_ids.tolist(), key_ids.tolist(), (queries[0, :, head] @ keys[0, :, kv].T) * weights.attn_scale


def qk_rows(components: ResidualComponents, layer: int, head: int, query_pos: int, key_pos: int,
            config: AttentionAttributionConfig) -> list[tuple]:
    """The stored QK attribution of one attention edge (see the module docstring), as QK_COLUMNS tuples."""
    edge = pd.DataFrame({"layer": [layer], "head": [head], "query_pos": [query_pos], "key_pos": [key_pos]})
    frame = _layer_rows(components, layer, edge, config, QKChunks(2, 1, components.cached_positions))
    return list(frame[QK_COLUMNS].itertuples(index=False, name=None))


def attention_edges(loadings: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The distinct (layer, head, query_pos, key_pos) that head loadings point at, the `limit` with the
    largest |part| first."""
    heads = loadings[loadings["head"] >= 0].assign(size=lambda f: f["weight"].abs())
    ranked = heads.groupby(EDGE_KEYS, as_index=False)["size"].max().sort_values("size", ascending=False, kind="stable")
    return ranked[EDGE_KEYS].head(limit).reset_index(drop=True)


def qk_attribution(lrm: LocalReplacementModel, loadings: pd.DataFrame, config: AttentionAttributionConfig,
                   chunks: QKChunks | None = None, memory_budget: int | None = None) -> pd.DataFrame:
    """QK attribution of every attention edge that carries a stored head loading (up to the limit), in
    the order of attention_edges. `chunks` fixes how much is held at once; else they are planned to fit
    `memory_budget` bytes (None: the machine's default budget)."""
    edges = attention_edges(loadings, config.max_attention_edges)
    if not len(edges):
        return pd.DataFrame(columns=QK_COLUMNS)
    if chunks is None:
        chunks = plan_qk_chunks(lrm, len(edges), default_budget_bytes() if memory_budget is None else memory_budget,
                                qk_output_bytes(len(edges), config))
    components = ResidualComponents(lrm, chunks.cached_positions)
    edges["rank"] = np.arange(len(edges))
    frames = []
    for layer, layer_edges in edges.groupby("layer", sort=True):
        layer_edges = layer_edges.sort_values(["query_pos", "key_pos"], kind="stable")
        for group in _position_groups(layer_edges, chunks.positions):
            frames.append(_layer_rows(components, int(layer), group, config, chunks))
    frame = pd.concat(frames, ignore_index=True)
    return frame.sort_values(["rank", "slot"], kind="stable", ignore_index=True)[QK_COLUMNS]


def _position_groups(edges: pd.DataFrame, max_positions: int) -> list[pd.DataFrame]:
    """Consecutive runs of `edges` (sorted by query position) whose query and key positions together
    number at most max_positions (a single edge always forms a group)."""
    groups, start, seen = [], 0, set()
    for i, (query, key) in enumerate(zip(edges["query_pos"], edges["key_pos"])):
        new = {("q", query), ("k", key)} - seen
        if len(seen) + len(new) > max_positions and i > start:
            groups.append(edges.iloc[start:i])
            start, seen = i, set()
            new = {("q", query), ("k", key)}
        seen |= new
    groups.append(edges.iloc[start:])
    return groups


def _layer_rows(components: ResidualComponents, layer: int, edges: pd.DataFrame,
                config: AttentionAttributionConfig, chunks: QKChunks) -> pd.DataFrame:
    """QK rows of attention edges of one layer: per edge, in order (slot), the top pairs, pair_rest,
    offset, the top query marginals and their rest, the top key marginals and their rest."""
    weights = components.lrm.model
    group = weights.n_heads // weights.n_kv_heads
    query_positions, query_index = np.unique(edges["query_pos"].to_numpy(), return_inverse=True)
    key_positions, key_index = np.unique(edges["key_pos"].to_numpy(), return_inverse=True)
    heads = edges["head"].to_numpy()
    query_heads = [np.unique(heads[query_index == i]).tolist() for i in range(len(query_positions))]
    key_heads = [np.unique(heads[key_index == i] // group).tolist() for i in range(len(key_positions))]
    query_ids, queries = components.projected(layer, query_positions.tolist(), "q", query_heads)  # [Pq, nq, slots, dh]
    key_ids, keys = components.projected(layer, key_positions.tolist(), "k", key_heads)  # [Pk, nk, slots, dh]
    query_slot, key_slot = _slots(query_heads, weights.n_heads), _slots(key_heads, weights.n_kv_heads)
    query_count, key_count = torch.tensor([len(i) for i in query_ids]), torch.tensor([len(i) for i in key_ids])
    query_ids, key_ids = _padded_ids(query_ids, queries.shape[1]), _padded_ids(key_ids, keys.shape[1])
    queries = queries * weights.attn_scale
    heads = torch.tensor(heads)
    offsets = weights.gate_offsets[layer].double() if weights.gate_offsets is not None else None
    columns = []
    for rows in torch.arange(len(edges)).split(chunks.edges):
        q, k, h = query_index[rows.numpy()], key_index[rows.numpy()], heads[rows]
        offset = offsets[h] if offsets is not None else torch.zeros(len(rows), dtype=torch.float64)
        batch = _edge_columns(queries[q, :, query_slot[q, h]], keys[k, :, key_slot[k, h // group]], query_count[q],
                              key_count[k], query_ids[q], key_ids[k], offset, config, weights.attn_softcap)
        batch["edge"] = rows.numpy()[batch["edge"]]
        columns.append(batch)
    frame = pd.DataFrame({name: np.concatenate([c[name] for c in columns]) for name in columns[0]})
    edge = frame.pop("edge")
    for name in edges.columns:  # the edge's keys (and its rank)
        frame[name] = edges[name].to_numpy()[edge]
    return frame


def _slots(heads: list[list[int]], n_heads: int) -> torch.Tensor:
    """[row, head] -> the slot of `head` at position row in `projected`'s output (heads[row] in slot order)."""
    slots = torch.zeros(len(heads), n_heads, dtype=torch.long)
    for row, chosen in enumerate(heads):
        slots[row, chosen] = torch.arange(len(chosen))
    return slots


def _padded_ids(ids: list[np.ndarray], width: int) -> np.ndarray:
    """Component ids per position as an array [n_positions, width], padded with ""."""
    out = np.full((len(ids), width), "", dtype=object)
    for i, row in enumerate(ids):
        out[i, :len(row)] = row
    return out


def _edge_columns(queries: torch.Tensor, keys: torch.Tensor, n_query: torch.Tensor, n_key: torch.Tensor,
                  query_ids: np.ndarray, key_ids: np.ndarray, offset: torch.Tensor, config: AttentionAttributionConfig,
                  softcap: float | None = None) -> dict:
    """The rows of a batch of edges as columns. queries [B, nq, dh] (times the attention scaling) and keys
    [B, nk, dh] are zero padded beyond n_query, n_key; query_ids [B, nq], key_ids [B, nk], offset [B]; the
    gate logit is cap * tanh(score / cap) + offset with an attention soft-cap `softcap`
    -> {edge, slot, kind, query_component, key_component, value, gate_logit}, one entry per row."""
    n_edges, width_q, width_k = len(queries), queries.shape[1], keys.shape[1]
    real_q = torch.arange(width_q)[None] < n_query[:, None]  # [B, nq]
    real_k = torch.arange(width_k)[None] < n_key[:, None]
    exact_q, exact_k = queries.double(), keys.double()
    query_marginal = torch.bmm(exact_q, exact_k.sum(1)[:, :, None])[..., 0]  # [B, nq]: sums over keys, exactly
    key_marginal = torch.bmm(exact_k, exact_q.sum(1)[:, :, None])[..., 0]  # [B, nk]
    score = query_marginal.sum(1)
    logit = capped(score, softcap) + offset
    kinds, query_comp, key_comp, values, valid = [], [], [], [], []
    batch = np.arange(n_edges)[:, None]

    def add(kind, query, key, value, ok):  # [B, n] blocks of one kind
        kinds.append(np.broadcast_to(np.array(kind, dtype=object), value.shape))
        query_comp.append(np.broadcast_to(query, value.shape))
        key_comp.append(np.broadcast_to(key, value.shape))
        values.append(value)
        valid.append(np.broadcast_to(ok, value.shape))

    magnitude = torch.bmm(queries, keys.transpose(1, 2)).abs_().flatten(1)  # [B, nq*nk] |pair|, padding 0
    n_top = min(config.qk_top_pairs, width_q * width_k)
    top = magnitude.topk(n_top, dim=1).indices  # [B, n_top]
    padding = (top // width_k >= n_query[:, None]) | (top % width_k >= n_key[:, None])
    for edge in padding.any(1).nonzero().flatten().tolist():  # fewer nonzero pairs than n_top: rank padding last
        grid = magnitude[edge].view(width_q, width_k)
        grid[n_query[edge]:] = -1
        grid[:, n_key[edge]:] = -1
        top[edge] = magnitude[edge].topk(n_top).indices
    del magnitude
    top_ok = (torch.arange(n_top)[None] < (n_query * n_key)[:, None].clamp(max=config.qk_top_pairs)).numpy()
    top_q, top_k = top // width_k, top % width_k
    rows = torch.arange(n_edges)[:, None]
    top_values = (queries[rows, top_q] * keys[rows, top_k]).sum(-1)  # [B, n_top] the signed pairs
    top_q, top_k = top_q.numpy(), top_k.numpy()
    add("pair", query_ids[batch, top_q], key_ids[batch, top_k], top_values.double().numpy(), top_ok)
    rest = score - (top_values.double() * torch.as_tensor(top_ok)).sum(1)
    ones = np.ones((n_edges, 1), dtype=bool)
    add("pair_rest", np.array("*", dtype=object), np.array("*", dtype=object), rest.numpy()[:, None], ones)
    add("offset", np.array("b", dtype=object), np.array("b", dtype=object), offset.numpy()[:, None], ones)
    for side, marginal, real, ids, limit in (("query", query_marginal, real_q, query_ids, n_query),
                                             ("key", key_marginal, real_k, key_ids, n_key)):
        n_top = min(config.qk_top_marginals, marginal.shape[1])
        top = marginal.abs().masked_fill(~real, -1).topk(n_top, dim=1).indices
        top_ok = (torch.arange(n_top)[None] < limit[:, None].clamp(max=config.qk_top_marginals)).numpy()
        chosen = ids[batch, top.numpy()]
        star = np.array("*", dtype=object)
        top_values = marginal.gather(1, top)
        add(f"{side}_marginal", chosen if side == "query" else star, chosen if side == "key" else star,
            top_values.numpy(), top_ok)
        rest = score - (top_values * torch.as_tensor(top_ok)).sum(1)
        add(f"{side}_marginal_rest", star, star, rest.numpy()[:, None], ones)
    ok = np.concatenate(valid, axis=1)  # [B, slots], slots in row order
    slot = np.broadcast_to(np.arange(ok.shape[1]), ok.shape)
    return {
        "edge": np.broadcast_to(batch, ok.shape)[ok], "slot": slot[ok],
        "kind": np.concatenate(kinds, axis=1)[ok], "query_component": np.concatenate(query_comp, axis=1)[ok],
        "key_component": np.concatenate(key_comp, axis=1)[ok],
        "value": np.concatenate(values, axis=1)[ok].astype(np.float64),
        "gate_logit": np.broadcast_to(logit.numpy()[:, None], ok.shape)[ok],
    }
