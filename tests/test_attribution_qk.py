"""QK attribution: components rebuild the residual, pairs rebuild the gate logit the model computed."""

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


@pytest.mark.parametrize("kind", ["dense", "gated"])
def test_components_sum_to_the_residual(kind):
    _, lrm = replacement(kind)
    components = ResidualComponents(lrm)
    for layer in range(lrm.n_layers):
        for pos in range(lrm.n_pos):
            ids, vectors = components.at(layer, pos)
            assert len(ids) == len(set(ids)) == len(vectors)
            torch.testing.assert_close(vectors.sum(0), lrm.prompt.resid_pre[layer, pos], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "gated"])
def test_pairs_sum_to_the_models_gate_logit(kind):
    model, lrm = replacement(kind)
    components = ResidualComponents(lrm)
    for layer in range(lrm.n_layers):
        scores = model_scores(model, lrm, layer)
        for head in range(lrm.model.n_heads):
            for query, key in [(lrm.n_pos - 1, 0), (lrm.n_pos - 1, 2), (3, 3), (4, 1)]:
                _, _, pairs = qk_pair_contributions(components, layer, head, query, key)
                expected = scores[head, query, key]
                scale = max(float(pairs.abs().sum()), float(scores.abs().max()))  # tiny scores at layer 0
                assert abs(pairs.sum() - expected) <= 1e-5 * scale
                if kind == "gated":  # the gate is open exactly when score + b > 0
                    logit = pairs.sum() + lrm.model.gate_offsets[layer, head]
                    assert bool(lrm.prompt.patterns[layer, head, query, key] != 0) == bool(logit > 0)


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
