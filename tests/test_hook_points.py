"""Named hook points on the tiny Llama and a tiny GatedModel: each name records what its module computes,
replacements flow downstream, hooks never outlive their block, and bad names fail with one clear error."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from sparse_attention.gated_attention import GatedModel
from sparse_attention.hook_points import (
    HeadInputs,
    HookPointError,
    hf_model,
    hook_names,
    hooks,
    layers,
    module,
    replace_module,
)

pytestmark = pytest.mark.usefixtures("one_thread")
N_LAYERS, N_HEADS, N_KV_HEADS, HEAD_DIM = 2, 4, 2, 8  # tests/conftest.py TINY_LLAMA


@pytest.fixture(scope="module", params=["hf", "gated"])
def model(request, tiny):
    """The plain tiny Llama, or a copy wrapped in a GatedModel with hard gates (offset 0 closes some)."""
    plain, _ = tiny
    if request.param == "hf":
        return plain
    return GatedModel(copy.deepcopy(plain), offset_init=0.0).eval().set_mode("eval")


def token_ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))


def no_hooks_left(model) -> bool:
    """No hook of hook_points is attached, no forward replaced (transformers attaches its own output-capturing hooks)."""
    attached = [fn for m in hf_model(model).modules() for fn in [*m._forward_hooks.values(),
                                                                  *m._forward_pre_hooks.values()]]
    overridden = [m for m in hf_model(model).modules() if "forward" in m.__dict__]  # a split input's projection
    return all(fn.__module__ != "sparse_attention.hook_points" for fn in attached) and not overridden


def record_all(model, ids: torch.Tensor):
    seen = {}

    def keep(name):
        def fn(tensor):
            seen[name] = tensor.detach().clone()
        return fn

    with torch.no_grad(), hooks(model, {name: keep(name) for name in hook_names(model)}):
        out = model(input_ids=ids, output_attentions=True)
    return seen, out


def test_every_hook_point_records_what_its_module_computes(model):
    ids = token_ids()
    seen, out = record_all(model, ids)
    assert set(seen) == set(hook_names(model)) and len(seen) == 3 + 10 * N_LAYERS
    with torch.no_grad():
        assert torch.equal(seen["hook_embed"], module(model, "embed")(ids))
        assert torch.equal(seen["blocks.0.hook_resid_pre"], seen["hook_embed"])
        for layer in range(N_LAYERS):
            at = {name[len(f"blocks.{layer}."):]: value for name, value in seen.items()
                  if name.startswith(f"blocks.{layer}.")}
            normalized = module(model, f"blocks.{layer}.ln1")(at["hook_resid_pre"])
            assert torch.equal(at["ln1.hook_normalized"], normalized)
            for kind in "qkv":
                assert torch.equal(at[f"attn.hook_{kind}"], module(model, f"blocks.{layer}.attn.{kind}")(normalized))
            values = at["attn.hook_v"].view(2, 7, N_KV_HEADS, HEAD_DIM).repeat_interleave(N_HEADS // N_KV_HEADS, 2)
            z = torch.einsum("bhqk,bkhd->bqhd", out.attentions[layer], values).flatten(2)  # weights as applied
            torch.testing.assert_close(at["attn.hook_z"], z, rtol=0, atol=1e-6)
            assert torch.equal(at["hook_attn_out"], module(model, f"blocks.{layer}.attn.o")(at["attn.hook_z"]))
            assert torch.equal(at["hook_resid_mid"], at["hook_resid_pre"] + at["hook_attn_out"])
            assert torch.equal(at["ln2.hook_normalized"], module(model, f"blocks.{layer}.ln2")(at["hook_resid_mid"]))
            assert torch.equal(at["hook_mlp_out"], module(model, f"blocks.{layer}.mlp")(at["ln2.hook_normalized"]))
            resid_post = at["hook_resid_mid"] + at["hook_mlp_out"]
            following = f"blocks.{layer + 1}.hook_resid_pre" if layer + 1 < N_LAYERS else "hook_resid_final"
            assert torch.equal(seen[following], resid_post)
        assert torch.equal(seen["ln_final.hook_normalized"], module(model, "ln_final")(seen["hook_resid_final"]))
        assert torch.equal(out.logits, module(model, "unembed")(seen["ln_final.hook_normalized"]))
    assert no_hooks_left(model)


def test_a_returned_tensor_replaces_the_point_downstream(model):
    ids, seen = token_ids(), {}

    def zero(tensor):
        return torch.zeros_like(tensor)

    with torch.no_grad(), hooks(model, {
        "blocks.1.hook_mlp_out": zero,  # output side
        "hook_resid_final": lambda resid: seen.setdefault("final", resid),
        "blocks.1.hook_resid_mid": lambda resid: seen.setdefault("mid", resid),
        "blocks.0.ln2.hook_normalized": zero,
        "blocks.0.hook_mlp_out": lambda out: seen.setdefault("mlp0", out),
    }):
        model(input_ids=ids)
    assert torch.equal(seen["final"], seen["mid"])  # layer 1 added nothing after attention
    mlp = module(model, "blocks.0.mlp")
    assert torch.equal(seen["mlp0"], mlp(torch.zeros(2, 7, 32)))  # the MLP read the replaced input
    with torch.no_grad(), hooks(model, {"hook_resid_final": zero}):  # input side
        logits = model(input_ids=ids).logits
    assert torch.equal(logits, torch.zeros_like(logits))  # RMSNorm of zeros is zero
    assert no_hooks_left(model)


def test_hooks_are_removed_after_the_block_even_when_it_raises(model):
    ids = token_ids()
    with pytest.raises(RuntimeError, match="in the block"):
        with hooks(model, {"blocks.0.hook_resid_pre": lambda x: None, "hook_embed": lambda x: None}):
            assert not no_hooks_left(model)
            raise RuntimeError("in the block")
    assert no_hooks_left(model)

    def stop(tensor):
        raise RuntimeError("in a hook")

    with pytest.raises(RuntimeError, match="in a hook"), hooks(model, {"blocks.0.hook_mlp_out": stop}):
        model(input_ids=ids)
    assert no_hooks_left(model)


def test_unknown_names_and_architectures_are_one_clear_error(model):
    name = "LlamaForCausalLM"
    with pytest.raises(HookPointError, match=f"{name} has no hook point named 'blocks.0.hook_nope'"):
        with hooks(model, {"hook_embed": lambda x: None, "blocks.0.hook_nope": lambda x: None}):
            pass
    assert no_hooks_left(model)  # nothing was attached before the bad name was found
    with pytest.raises(HookPointError, match=f"{name} has 2 layers: no hook point named 'blocks.2.hook_mlp_out'"):
        with hooks(model, {"blocks.2.hook_mlp_out": lambda x: None}):
            pass
    with pytest.raises(HookPointError, match=f"{name} has no module named 'blocks.0.ln3'"):
        module(model, "blocks.0.ln3")
    assert len(layers(model)) == N_LAYERS and layers(model)[1] is module(model, "blocks.1")
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=16, max_position_embeddings=8))
    with pytest.raises(HookPointError, match="GPTNeoXForCausalLM has no named hook points: model family 'gpt_neox'"):
        with hooks(neox, {"hook_embed": lambda x: None}):
            pass


def run_with(model, ids, fns, read):
    """Forward with `fns` attached and `read` (names) recorded: {name: tensor}."""
    seen = {}

    def keep(name):
        def fn(tensor):
            seen[name] = tensor.detach().clone()
        return fn

    with torch.no_grad(), hooks(model, {**fns, **{name: keep(name) for name in read}}):
        model(input_ids=ids)
    return seen


def test_reader_inputs_read_the_residual_and_replace_only_their_reader(model):
    ids, d_model = token_ids(), N_HEADS * HEAD_DIM
    read = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.attn.hook_q", "blocks.1.attn.hook_k",
            "blocks.1.attn.hook_v", "blocks.1.hook_mlp_out", "hook_resid_final"]
    inputs = ["blocks.1.hook_q_input", "blocks.1.hook_k_input", "blocks.1.hook_v_input", "blocks.1.hook_mlp_in"]
    clean = run_with(model, ids, {}, read + inputs)
    resid = clean["blocks.1.hook_resid_pre"][:, :, None, :]
    assert torch.equal(clean["blocks.1.hook_q_input"], resid.expand(2, 7, N_HEADS, d_model))
    assert torch.equal(clean["blocks.1.hook_k_input"], resid.expand(2, 7, N_KV_HEADS, d_model))
    assert torch.equal(clean["blocks.1.hook_mlp_in"], clean["blocks.1.hook_resid_mid"])
    assert set(hook_names(model)).isdisjoint(inputs)

    same = run_with(model, ids, {"blocks.1.hook_q_input": lambda x: x.clone()}, read)
    torch.testing.assert_close(same["blocks.1.attn.hook_q"], clean["blocks.1.attn.hook_q"], rtol=0, atol=1e-6)

    other = torch.randn(2, 7, d_model, generator=torch.Generator().manual_seed(1))

    def head_1_reads_other(x):
        x = x.clone()
        x[:, :, 1] = other
        return x

    patched = run_with(model, ids, {"blocks.1.hook_k_input": head_1_reads_other}, read)
    ln1, k_proj = module(model, "blocks.1.ln1"), module(model, "blocks.1.attn.k")
    with torch.no_grad():
        expected = k_proj(ln1(clean["blocks.1.hook_resid_pre"]))
        expected[..., HEAD_DIM:2 * HEAD_DIM] = k_proj(ln1(other))[..., HEAD_DIM:2 * HEAD_DIM]
    torch.testing.assert_close(patched["blocks.1.attn.hook_k"], expected, rtol=0, atol=1e-6)
    only_head_1 = run_with(model, ids, {"blocks.1.hook_k_input": lambda x: HeadInputs(torch.tensor([1]),
                                                                                       other[:, :, None])}, read)
    for name in read:  # the same run, head 0 projected from the shared input
        torch.testing.assert_close(only_head_1[name], patched[name], rtol=0, atol=1e-6)
    for name in ("blocks.1.hook_resid_pre", "blocks.1.attn.hook_q", "blocks.1.attn.hook_v"):
        assert torch.equal(patched[name], clean[name])
    assert not torch.equal(patched["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"])

    zeroed = run_with(model, ids, {"blocks.1.hook_mlp_in": torch.zeros_like}, read)
    with torch.no_grad():
        assert torch.equal(zeroed["blocks.1.hook_mlp_out"], module(model, "blocks.1.mlp")(torch.zeros(2, 7, d_model)))
    assert torch.equal(zeroed["hook_resid_final"], clean["blocks.1.hook_resid_mid"] + zeroed["blocks.1.hook_mlp_out"])
    assert no_hooks_left(model)


def test_replace_module_swaps_the_named_module(model):
    copied = copy.deepcopy(model)
    new = torch.nn.Identity()
    replace_module(copied, "blocks.1.mlp", new)
    assert module(copied, "blocks.1.mlp") is new and module(model, "blocks.1.mlp") is not new
    with pytest.raises(HookPointError, match="has no module named 'blocks.0.mlp2'"):
        replace_module(copied, "blocks.0.mlp2", new)
