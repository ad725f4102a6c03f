"""Every family of sparse_attention/architectures.py on a tiny random config (float32): open gates reproduce
the original logits, hook points add up the residual stream, attribution is exact where a family supports
it, and every stage refuses a family outside the table (or one it cannot compute exactly) with one error."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sparse_attention.architectures import ArchitectureError, architecture, require, trainable_pattern
from sparse_attention.gated_attention import GatedModel
from sparse_attention.hook_points import HookPointError, hook_names, hooks
from sparse_attention.models import byte_tokenizer

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
    "gemma3": lambda: (Gemma3ForCausalLM, Gemma3TextConfig(
        **SHAPE, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gpt2": lambda: (GPT2LMHeadModel, GPT2Config(
        n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=D_MLP, n_positions=64, initializer_range=0.2,
        attn_implementation="eager")),
}
ATTRIBUTED = ["llama", "llama3-rope", "qwen2", "qwen3"]  # families whose replacement model is exact


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
        with pytest.raises(HookPointError, match="no hook point named 'blocks.0.attn.hook_q'"):
            with hooks(model, {"blocks.0.attn.hook_q": keep("q")}):
                pass
        names = [n for n in names if not n.endswith(("hook_q", "hook_k", "hook_v"))]
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
    with pytest.raises(ArchitectureError, match="'gpt2' cannot run the attribution stage: LayerNorm"):
        require(tiny_family("gpt2")[0], "attribution")
    assert architecture(GatedModel(tiny_family("qwen3")[0], 0.0)).family == "qwen3"
