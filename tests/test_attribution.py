"""Attribution graphs on tiny dense and gated Llamas: exact perturbation and completeness checks.

The perturbation check runs the HF model itself with its attention patterns, norm scales and MLP
outputs patched to the frozen values (no code shared with attribution.propagate), removes one source
node, and checks every target moves by minus its edge weight. With a CLT skip path the MLP outputs at
positions > 0 keep it live: the frozen skip output is replaced by W_skip applied to the MLP input of the
patched forward.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from attribution.config import GraphConfig
from attribution.graph import attribute
from attribution.nodes import build_replacement, transcoder_weights
from attribution.replacement import (
    AttributionError,
    PromptTooLongError,
    extract_weights,
    freeze_prompt,
    tokenize_prompt,
)
from sparse_attention.gated_attention import GatedModel
from sparse_attention.hook_points import hf_model
from sparse_attention.models import TinyModelConfig, tiny_model
from transcoders.clt import CLTConfig, CrossLayerTranscoder

TINY = TinyModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=1)
PROMPT = "The cat sat on"
N_FEATURES = 16


def random_clt(n_layers: int, d_model: int, n_features: int, seed: int = 0, skip: bool = False
               ) -> CrossLayerTranscoder:
    """A CLT with weights scaled so that a fair share of features fire on the tiny model, and with
    training-time normalisation scales left unfolded (attribution must fold them); `skip` adds a random
    skip path whose output is about as large as the tiny model's residual stream (so paths through it
    weigh about as much as the others: its gain through the frozen norm is about 1)."""
    g = torch.Generator().manual_seed(seed)
    config = CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, skip=skip)
    clt = CrossLayerTranscoder(config, init=False)
    with torch.no_grad():
        clt.input_scale.copy_(torch.linspace(0.5, 2.0, n_layers))
        clt.output_scale.copy_(torch.linspace(1.5, 0.5, n_layers))
        clt.W_enc.copy_(torch.randn(n_layers, n_features, d_model, generator=g) / d_model**0.5
                        * clt.input_scale[:, None, None])
        clt.b_enc.copy_(torch.randn(n_layers, n_features, generator=g) * 0.1)
        clt.threshold.fill_(0.4)
        for weight in clt.W_dec:
            weight.copy_(torch.randn(weight.shape, generator=g) / n_features**0.5)
        clt.b_dec.copy_(torch.randn(n_layers, d_model, generator=g) * 0.1)
        if skip:
            clt.W_skip.copy_(torch.randn(n_layers, d_model, d_model, generator=g) * 0.02 / d_model**0.5)
    return clt.eval()


def make_model(kind: str, config: TinyModelConfig = TINY):
    """'hf': the plain HF model; 'dense': a GatedModel with gates off; 'gated': hard gates, about half shut;
    'closed': 'gated' with heads L1H1 and L2H0 closed."""
    model, tokenizer = tiny_model(config)
    if kind == "hf":
        return model, tokenizer
    gated = GatedModel(model, offset_init=0.0, closed_heads=[(1, 1), (2, 0)] if kind == "closed" else ()).eval()
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.3, 0.3, gated.offsets.numel()).view_as(gated.offsets))
    return gated.set_mode("dense" if kind == "dense" else "eval"), tokenizer


def replacement(kind: str, prompt: str = PROMPT, clt_seed: int = 0, skip: bool = False):
    model, tokenizer = make_model(kind)
    weights = extract_weights(model)
    clt = random_clt(TINY.n_layers, TINY.d_model, N_FEATURES, seed=clt_seed, skip=skip)
    frozen = freeze_prompt(model, tokenize_prompt(tokenizer, prompt))
    return model, build_replacement(weights, transcoder_weights(clt, weights), frozen)


@contextlib.contextmanager
def patched_forwards(patches: list[tuple[nn.Module, object]]):
    """Replace `module.forward` for each (module, function) pair for the duration of the block."""
    try:
        for module, forward in patches:
            module.forward = forward
        yield
    finally:
        for module, _ in patches:
            del module.forward


def frozen_forward(model, lrm, mlp_out: torch.Tensor, embed_delta: torch.Tensor, patterns: torch.Tensor | None = None):
    """The HF model with frozen patterns (default: the prompt's), norm scales and MLP outputs (with a CLT skip
    path, its part of mlp_out at positions > 0 recomputed from this forward's MLP input).
    -> (mlp_in [L, P, d], logits [V])"""
    hf, frozen = hf_model(model), lrm.prompt
    patterns = frozen.patterns if patterns is None else patterns
    seen = {}
    patches = []
    embed = hf.model.embed_tokens
    patches.append((embed, lambda ids: nn.functional.embedding(ids, embed.weight) + embed_delta))
    for index, layer in enumerate(hf.model.layers):
        attn = layer.self_attn

        def attention(hidden_states, *args, attn=attn, index=index, **kwargs):
            n_pos = hidden_states.shape[1]
            values = attn.v_proj(hidden_states).view(1, n_pos, -1, attn.head_dim).transpose(1, 2)
            values = values.repeat_interleave(attn.num_key_value_groups, dim=1)  # [1, H, P, dh]
            mixed = (patterns[index][None] @ values).transpose(1, 2).reshape(1, n_pos, -1)
            return attn.o_proj(mixed), None

        def norm_in(x, layer=layer, index=index):
            return layer.input_layernorm.weight * (x * frozen.attn_inv_rms[index][None, :, None])

        def norm_mid(x, layer=layer, index=index):
            seen[index] = layer.post_attention_layernorm.weight * (x * frozen.mlp_inv_rms[index][None, :, None])
            return seen[index]

        patches += [(attn, attention), (layer.input_layernorm, norm_in), (layer.post_attention_layernorm, norm_mid),
                    (layer.mlp, lambda x, index=index: mlp_out[index][None] + live_skip(lrm, index, x[0])[None])]
    final = hf.model.norm
    patches.append((final, lambda x: final.weight * (x * frozen.final_inv_rms[None, :, None])))
    with patched_forwards(patches), torch.no_grad():
        logits = hf(input_ids=lrm.prompt.tokens[None], use_cache=False).logits[0, -1]
    return torch.stack([seen[i][0] for i in range(len(seen))]), logits


def live_skip(lrm, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
    """The skip output for MLP input mlp_in [P, d] minus the frozen prompt's, zero at position 0 (0 without skip)."""
    if lrm.clt.W_skip is None:
        return torch.zeros_like(mlp_in)
    change = (mlp_in - lrm.prompt.mlp_in[layer]) @ lrm.clt.W_skip[layer]
    change[0] = 0
    return change


def target_values(lrm, graph, mlp_in: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Feature pre-activations and demeaned logits of the graph's targets (0 for errors and tokens)."""
    values = torch.zeros(graph.n_nodes)
    layer, pos, feat = graph.active_features[graph.selected].unbind(1)
    values[:graph.n_selected] = (lrm.clt.W_enc[layer, feat] * mlp_in[layer, pos]).sum(-1) + lrm.clt.b_enc[layer, feat]
    values[graph.logit_start:] = logits[graph.logit_tokens] - logits.mean()
    return values


def source_removal(lrm, graph, node: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp_out, embed_delta) with source `node` removed from the frozen forward."""
    mlp_out, delta = lrm.prompt.mlp_out.clone(), torch.zeros(graph.n_pos, lrm.model.d_model)
    if node < graph.n_selected:
        layer, pos, feat = graph.active_features[graph.selected[node]].tolist()
        activation = graph.activations[graph.selected[node]]
        mlp_out[layer:, pos] -= activation * lrm.clt.W_dec[layer][feat]
    elif node < graph.token_start:
        layer, pos = divmod(node - graph.error_start, graph.n_pos)
        mlp_out[layer, pos] -= lrm.errors[layer, pos]
    else:
        pos = node - graph.token_start
        delta[pos] = -lrm.model.embed[graph.tokens[pos]]
    return mlp_out, delta


def closeness_scale(graph) -> torch.Tensor:
    """Per target: |value| + sum |incoming edges| + |constant|, the scale of float32 rounding in a row."""
    return graph.node_value.abs() + graph.adjacency.abs().sum(1) + graph.node_constant.abs()


@pytest.mark.parametrize("kind, skip", [("hf", False), ("dense", False), ("gated", False), ("dense", True),
                                        ("gated", True), ("closed", False)])
def test_perturbing_a_source_moves_targets_by_edge_weight(kind, skip):
    model, lrm = replacement(kind, skip=skip)
    if kind == "closed":  # the closed heads' frozen patterns hold nothing; open, the same heads attend
        assert not lrm.prompt.patterns[1, 1].any() and not lrm.prompt.patterns[2, 0].any()
        open_patterns = replacement("gated", skip=skip)[1].prompt.patterns
        assert open_patterns[1, 1].any() and open_patterns[2, 0].any()
        assert torch.equal(lrm.prompt.patterns[1, 2:], open_patterns[1, 2:])  # layer 1's other heads: the same input
    assert lrm.has_skip == skip
    graph = attribute(lrm, GraphConfig())
    assert graph.n_selected > 20 and len(graph.logit_tokens) >= 1
    assert_removing_each_source_moves_targets_by_its_edges(model, lrm, graph)


def assert_removing_each_source_moves_targets_by_its_edges(model, lrm, graph) -> None:
    """The perturbation check: the frozen forward reproduces every node value, and removing one source at a
    time moves each target (selected features and logits) by minus that edge's weight."""
    zero_delta = torch.zeros(graph.n_pos, lrm.model.d_model)
    base = target_values(lrm, graph, *frozen_forward(model, lrm, lrm.prompt.mlp_out, zero_delta))
    scale = closeness_scale(graph)
    torch.testing.assert_close(base, graph.node_value, rtol=0, atol=1e-6 * float(scale.max()))
    is_target = torch.zeros(graph.n_nodes, dtype=torch.bool)
    is_target[:graph.n_selected] = is_target[graph.logit_start:] = True
    for source in range(graph.logit_start):
        moved = target_values(lrm, graph, *frozen_forward(model, lrm, *source_removal(lrm, graph, source))) - base
        error = (moved + graph.adjacency[:, source])[is_target].abs()
        assert (error <= 1e-5 * scale[is_target]).all(), f"source {source}: max error {error.max():.3g}"


def test_gated_model_has_shut_gates_and_sparser_graph():
    _, dense = replacement("dense")
    _, gated = replacement("gated")
    assert (dense.prompt.patterns > 0).sum() > (gated.prompt.patterns > 0).sum() > 0
    dense_graph, gated_graph = attribute(dense, GraphConfig()), attribute(gated, GraphConfig())
    # an edge between different positions needs an open attention path
    assert (gated_graph.adjacency != 0).sum() < (dense_graph.adjacency != 0).sum()


@pytest.mark.parametrize("kind, skip", [("dense", False), ("gated", False), ("dense", True), ("gated", True)])
def test_incoming_edges_plus_constants_equal_target_value(kind, skip):
    _, lrm = replacement(kind, prompt="Hello there, general Kenobi", skip=skip)
    graph = attribute(lrm, GraphConfig(min_block_rows=1, max_block_rows=7))  # many small blocks
    total = graph.adjacency.sum(1) + graph.node_constant
    rows = torch.cat([torch.arange(graph.n_selected), torch.arange(graph.logit_start, graph.n_nodes)])
    error = (total - graph.node_value)[rows].abs()
    assert (error <= 1e-5 * closeness_scale(graph)[rows]).all()
    # values are the real model's: pre-activations of active features are their activations
    torch.testing.assert_close(graph.node_value[:graph.n_selected], graph.activations, rtol=1e-5, atol=1e-6)


def test_block_layout_does_not_change_rows():
    _, lrm = replacement("gated")
    one = attribute(lrm, GraphConfig(min_block_rows=10_000, max_block_rows=10_000))
    many = attribute(lrm, GraphConfig(min_block_rows=1, max_block_rows=3))
    atol = 1e-6 * float(one.adjacency.abs().max())
    torch.testing.assert_close(one.adjacency, many.adjacency, rtol=1e-5, atol=atol)


def test_max_feature_nodes_keeps_rows_of_selected_features():
    _, lrm = replacement("dense")
    full = attribute(lrm, GraphConfig())
    capped = attribute(lrm, GraphConfig(max_feature_nodes=12, batch_size=2, update_interval=2))
    assert capped.n_selected == 12
    rows = torch.cat([capped.selected, torch.arange(full.logit_start, full.n_nodes)])
    columns = torch.cat([capped.selected, torch.arange(full.error_start, full.logit_start)])
    expected = full.adjacency[rows][:, columns]
    got = torch.cat([capped.adjacency[:12], capped.adjacency[capped.logit_start:]])[:, :capped.logit_start]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_prompt_longer_than_context_is_refused():
    model, tokenizer = tiny_model(TINY.model_copy(update={"max_position_embeddings": 8}))
    with pytest.raises(PromptTooLongError, match="context of 8"):
        freeze_prompt(model, tokenize_prompt(tokenizer, "a prompt far longer than eight bytes"))


def test_bad_inputs_are_refused():
    model, tokenizer = make_model("gated")
    with pytest.raises(AttributionError, match="non-empty"):
        tokenize_prompt(tokenizer, "")
    with pytest.raises(AttributionError, match="'train' mode"):
        freeze_prompt(model.set_mode("train"), [256, 65])
    weights = extract_weights(make_model("hf")[0])
    with pytest.raises(AttributionError, match="model has 3 of 32"):
        transcoder_weights(random_clt(2, 32, 4), weights)


def test_tokens_start_with_bos_like_circuit_tracer():
    _, tokenizer = tiny_model(TINY)
    assert tokenize_prompt(tokenizer, "ab") == [tokenizer.bos_token_id, 97, 98]
    assert tokenize_prompt(tokenizer, "<|bos|>ab") == [tokenizer.bos_token_id, 97, 98]


def test_clt_scales_are_folded_like_the_clt_itself():
    _, lrm = replacement("dense")
    clt = random_clt(TINY.n_layers, TINY.d_model, N_FEATURES, seed=0)
    with torch.no_grad():
        expected = clt.encode(lrm.prompt.mlp_in.transpose(0, 1)).transpose(0, 1)  # [L, P, F]
        expected[:, 0] = 0
        decoded = clt.decode(expected.transpose(0, 1)).transpose(0, 1)  # [L, P, d]
    torch.testing.assert_close(lrm.activations, expected[lrm.features.unbind(1)])
    assert int((expected != 0).sum()) == lrm.n_active
    torch.testing.assert_close(lrm.prompt.mlp_out[:, 1:] - lrm.errors[:, 1:], decoded[:, 1:], rtol=1e-5, atol=1e-5)
