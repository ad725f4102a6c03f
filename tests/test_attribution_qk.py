"""QK attribution: components rebuild the residual, pairs rebuild the gate logit the model computed; with a
CLT skip path each component is also checked against removing it from the residual stream."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from attribution.config import AttentionAttributionConfig, GraphConfig
from attribution.graph import attribute
from attribution.heads import head_loadings
from attribution.qk import QK_COLUMNS, ResidualComponents, qk_attribution, qk_pair_contributions, qk_rows
from sparse_attention.hook_points import hf_model
from tests.test_attribution import replacement
from tests.test_attribution_heads import strongest_edges


def model_scores(model, lrm, layer: int) -> torch.Tensor:
    """q.k / sqrt(dh) of `layer`, computed by the HF modules themselves.  -> [H, P, P]"""
    block = hf_model(model).model.layers[layer]
    attn = block.self_attn
    with torch.no_grad():
        hidden = block.input_layernorm(lrm.prompt.resid_pre[layer][None])
        n_pos = hidden.shape[1]
        q = attn.q_proj(hidden).view(1, n_pos, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, n_pos, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, lrm.prompt.rope_cos[layer][None], lrm.prompt.rope_sin[layer][None])
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        return (q @ k.transpose(2, 3))[0] * attn.scaling


@pytest.mark.parametrize("kind, skip", [("dense", False), ("gated", False), ("gated", True)])
def test_components_sum_to_the_residual(kind, skip):
    _, lrm = replacement(kind, skip=skip)
    components = ResidualComponents(lrm)
    for layer in range(lrm.n_layers):
        for pos in range(lrm.n_pos):
            ids, vectors = components.at(layer, pos)
            assert len(ids) == len(set(ids)) == len(vectors)
            torch.testing.assert_close(vectors.sum(0), lrm.prompt.resid_pre[layer, pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, skip", [("dense", False), ("gated", False), ("dense", True), ("gated", True),
                                        ("closed", False)])
def test_pairs_sum_to_the_models_gate_logit(kind, skip):
    model, lrm = replacement(kind, skip=skip)
    components = ResidualComponents(lrm)
    for layer in range(lrm.n_layers):
        scores = model_scores(model, lrm, layer)
        for head in range(lrm.model.n_heads):
            for query, key in [(lrm.n_pos - 1, 0), (lrm.n_pos - 1, 2), (3, 3), (4, 1)]:
                _, _, pairs = qk_pair_contributions(components, layer, head, query, key)
                expected = scores[head, query, key]
                scale = max(float(pairs.abs().sum()), float(scores.abs().max()))  # tiny scores at layer 0
                assert abs(pairs.sum() - expected) <= 1e-5 * scale
                if kind != "dense":  # the gate is open exactly when score + b > 0 and the head is not closed
                    logit = pairs.sum() + lrm.model.gate_offsets[layer, head]
                    head_open = (layer, head) not in model.closed_heads
                    assert bool(lrm.prompt.patterns[layer, head, query, key] != 0) == (bool(logit > 0) and head_open)


def residual_with_frozen_attention(lrm, pos: int, removed: str) -> torch.Tensor:
    """resid_pre[j][pos] for every j, recomputed with the attention outputs frozen to the real ones and the MLP
    outputs to their frozen parts plus the live skip output, with one source `removed` (a component id:
    token, feature or error node, or bias_{pos}).  -> [L + 1, d] (the last row: the final residual)"""
    frozen, W_skip = lrm.prompt, lrm.clt.W_skip
    x = lrm.model.embed[frozen.tokens[pos]] * (removed != f"E_{int(frozen.tokens[pos])}_{pos}")
    out = []
    for layer in range(lrm.n_layers):
        out.append(x)
        mid = x + frozen.resid_mid[layer, pos] - frozen.resid_pre[layer, pos]
        mlp_in = lrm.model.mlp_norm[layer] * mid * frozen.mlp_inv_rms[layer, pos]
        mlp_out = frozen.mlp_out[layer, pos] + (mlp_in - frozen.mlp_in[layer, pos]) @ W_skip[layer]
        if removed == f"bias_{pos}":
            mlp_out = mlp_out - lrm.constants[layer, pos]
        elif removed == f"{layer}_-1_{pos}":
            mlp_out = mlp_out - lrm.errors[layer, pos]
        for index in (lrm.features[:, 1] == pos).nonzero().flatten().tolist():
            source, _, feature = lrm.features[index].tolist()
            if removed == f"{source}_{feature}_{pos}" and source <= layer:
                mlp_out = mlp_out - lrm.activations[index] * lrm.clt.W_dec[source][feature, layer - source]
        x = mid + mlp_out
    return torch.stack([*out, x])


def test_components_through_skip_paths_are_what_removing_them_removes():
    _, lrm = replacement("gated", skip=True)
    components = ResidualComponents(lrm)
    for pos in (1, lrm.n_pos - 1):
        base = residual_with_frozen_attention(lrm, pos, "")
        torch.testing.assert_close(base[:-1], lrm.prompt.resid_pre[:, pos], rtol=1e-5, atol=1e-5)
        layer = lrm.n_layers - 1
        ids, vectors = components.at(layer, pos)
        checked = [i for i, name in enumerate(ids) if not name.startswith("attn_")]
        assert len(checked) > 2 + layer  # the token, features, the errors below the layer, the bias
        for i in checked:
            removed = base - residual_with_frozen_attention(lrm, pos, ids[i])
            scale = float(base[layer].abs().max() + vectors[i].abs().max())
            torch.testing.assert_close(vectors[i], removed[layer], rtol=0, atol=1e-5 * scale)


def test_stored_rows_sum_to_the_gate_logit():
    model, lrm = replacement("gated")
    components = ResidualComponents(lrm)
    config = AttentionAttributionConfig(qk_top_pairs=5, qk_top_marginals=3)
    rows = pd.DataFrame(qk_rows(components, 2, 1, lrm.n_pos - 1, 1, config), columns=QK_COLUMNS)
    logit = float(model_scores(model, lrm, 2)[1, lrm.n_pos - 1, 1] + lrm.model.gate_offsets[2, 1])
    scale = float(qk_pair_contributions(components, 2, 1, lrm.n_pos - 1, 1)[2].abs().sum())
    assert abs(rows["gate_logit"].iloc[0] - logit) <= 1e-5 * scale
    for kinds in (["pair", "pair_rest", "offset"], ["query_marginal", "query_marginal_rest", "offset"],
                  ["key_marginal", "key_marginal_rest", "offset"]):
        total = rows[rows["kind"].isin(kinds)]["value"].sum()
        assert abs(total - logit) <= 1e-5 * scale, kinds
    assert (rows["kind"] == "pair").sum() == 5 and (rows["kind"] == "query_marginal").sum() == 3


def test_attention_edges_behind_kept_edges_are_open():
    _, lrm = replacement("gated")
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 8)
    loadings = head_loadings(lrm, graph, targets, sources, AttentionAttributionConfig())
    pairs = qk_attribution(lrm, loadings, AttentionAttributionConfig(max_attention_edges=5))
    edges = pairs.groupby(["layer", "head", "query_pos", "key_pos"])["gate_logit"].first()
    assert 0 < len(edges) <= 5
    assert (edges > 0).all()  # every attention edge that carries part of a graph edge has an open gate
