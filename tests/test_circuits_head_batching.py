"""Single-head patching, many heads per forward (`head_patched_metrics`): equal to one pass per head on a tiny
dense and a tiny gated Llama, in both gate modes, for any number of copies per forward."""

from __future__ import annotations

import pytest
import torch

from circuits.config import CircuitError
from circuits.curves import PromptSet
from circuits.hooks import (
    clean_residuals,
    head_patched_metrics,
    patch_head_per_copy,
    patched_metric,
    prepare,
    record,
)
from circuits.layout import patch_heads
from prompts.batches import PromptBatch
from sparse_attention import hook_points
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import TinyModelConfig
from tests.test_architectures import CIRCUITS, tiny_family
from tests.test_circuits import make_model as circuits_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TinyModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=2)
CASES = [("dense", "recomputed"), ("gated", "recomputed"), ("gated", "frozen")]


def make_model(kind: str):
    """'dense': the HF Llama; 'gated': hard gates with offsets -0.3..0.3 (about half shut); weights amplified
    as in test_circuits so patching one head moves the metric."""
    return circuits_model("hf" if kind == "dense" else "gated", config=TINY)


@pytest.fixture(scope="module")
def batches():
    """Random-token prompts of two lengths (a batch of 4 and one of 2), clean and corrupted differing at every
    position, so every head's patch moves the metric well above the tolerance."""
    generator = torch.Generator().manual_seed(2)
    out = []
    for start, (b, p) in ((0, (4, 7)), (4, (2, 5))):
        clean, corrupted = (torch.randint(3, 200, (b, p), generator=generator) for _ in range(2))
        answers = torch.randint(3, 200, (b, 2), generator=generator)
        roles = (("bos",) + ("other",) * (p - 2) + ("end",),) * b  # head patching reads no roles
        out.append(PromptBatch(clean, corrupted, answers, torch.tensor([[1.0, -1.0]] * b), tuple(range(start, start + b)),
                               roles))
    return out


def every_head() -> torch.Tensor:
    return torch.cartesian_prod(torch.arange(TINY.n_layers), torch.arange(TINY.n_heads))  # [L * H, 2]


def one_pass_per_head(prepared, batch, corrupted, masks, heads: torch.Tensor) -> torch.Tensor:
    """[K, b]: `patched_metric` with keep_heads False at one head, one forward per head."""
    rows = []
    for layer, head in heads.tolist():
        keep = torch.ones(TINY.n_layers, TINY.n_heads, dtype=torch.bool)
        keep[layer, head] = False
        rows.append(patched_metric(prepared, batch, corrupted, masks, keep_heads=keep))
    return torch.stack(rows)


@pytest.mark.parametrize("kind,gates", CASES)
@pytest.mark.parametrize("max_tokens", [1, 40, 10_000])  # one copy, a few copies, every head of a layer per forward
def test_batched_head_patching_equals_one_pass_per_head(kind, gates, max_tokens, batches):
    prepared = prepare(make_model(kind), gates=gates)
    prompt_set = PromptSet(prepared, batches)
    heads = every_head().flip(0)  # rows out of layer order: each result must land on its own row
    for batch, corrupted, masks in zip(prompt_set.batches, prompt_set.recordings, prompt_set.masks):
        expected = one_pass_per_head(prepared, batch, corrupted, masks, heads)
        clean = patched_metric(prepared, batch, corrupted, masks)
        assert (expected - clean).abs().max() > 1e-2
        torch.testing.assert_close(head_patched_metrics(prepared, batch, corrupted, heads, masks, max_tokens),
                                   expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,gates", CASES)
def test_head_patching_effects_are_the_mean_effects_of_one_pass_per_head(kind, gates, batches):
    prepared = prepare(make_model(kind), gates=gates)
    prompt_set = PromptSet(prepared, batches)
    clean = prompt_set.mean_metric()
    expected = torch.zeros(TINY.n_layers, TINY.n_heads)
    for layer, head in (~prompt_set.dead_heads).nonzero().tolist():
        keep = torch.ones(TINY.n_layers, TINY.n_heads, dtype=torch.bool)
        keep[layer, head] = False
        expected[layer, head] = prompt_set.mean_metric(keep_heads=keep) - clean
    live = ~prompt_set.dead_heads
    assert expected[live].abs().min() > 5e-4 and expected.abs().max() > 1e-2
    torch.testing.assert_close(prompt_set.head_patching_effects(max_tokens=60), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CIRCUITS)
def test_batched_head_patching_in_every_family_circuits_support(name, batches):
    """The layers below the patched one are swapped out of each family's decoder loop (Qwen picks a layer's mask
    type by its index there): the same per-prompt metrics as one pass per head."""
    model = GatedModel(tiny_family(name)[0], offset_init=0.0).eval()
    with torch.no_grad():
        model.offsets.copy_(torch.linspace(-0.3, 0.3, model.offsets.numel()).view_as(model.offsets))
    prepared = prepare(model.set_mode("eval"))
    n_layers, n_heads = prepared.layout.n_layers, prepared.layout.n_heads
    heads = torch.cartesian_prod(torch.arange(n_layers), torch.arange(n_heads))
    batch = batches[0]
    corrupted, _ = record(prepared, batch.corrupted)
    expected = []
    for layer, head in heads.tolist():
        keep = torch.ones(n_layers, n_heads, dtype=torch.bool)
        keep[layer, head] = False
        expected.append(patched_metric(prepared, batch, corrupted, keep_heads=keep))
    expected = torch.stack(expected)
    assert (expected - patched_metric(prepared, batch, corrupted)).abs().max() > 1e-3
    torch.testing.assert_close(head_patched_metrics(prepared, batch, corrupted, heads), expected, rtol=0, atol=1e-6)


def test_gate_modes_differ_under_batched_patching(batches):
    """The gated model's patches flip gates when they are recomputed, so the two modes give different effects
    (the equality tests above tell them apart)."""
    model = make_model("gated")
    effects = {gates: PromptSet(prepare(model, gates=gates), batches).head_patching_effects()
               for gates in ("frozen", "recomputed")}
    assert (effects["frozen"] - effects["recomputed"]).abs().max() > 1e-3


def test_patch_head_per_copy_is_patch_heads_per_copy():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3 * 2, 5, 4 * 8, generator=generator)  # K = 3 copies of b = 2 prompts, H = 4 heads of 8
    z_corrupted = torch.randn(2, 5, 32, generator=generator)
    heads = torch.tensor([2, 0, 2])
    patched = patch_head_per_copy(z, z_corrupted, heads, 4).view(3, 2, 5, 32)
    for copy, head in enumerate(heads.tolist()):
        keep = torch.ones(4, dtype=torch.bool)
        keep[head] = False
        assert torch.equal(patched[copy], patch_heads(z.view(3, 2, 5, 32)[copy], z_corrupted, keep))


def test_the_model_runs_every_layer_again_afterwards(batches):
    """Layers below the patched one are skipped during the batched forward and put back after it."""
    prepared = prepare(make_model("dense"))
    batch = batches[0]
    layers = list(hook_points.layers(prepared.module))
    prompt_set = PromptSet(prepared, [batch])
    before = clean_residuals(prepared, batch.clean)
    prompt_set.head_patching_effects()
    assert list(hook_points.layers(prepared.module)) == layers
    assert torch.equal(clean_residuals(prepared, batch.clean), before)
    assert not torch.equal(before[2], before[1])  # layer 1 runs: the residual changes across it
    with pytest.raises(CircuitError, match=r"\[K, 2\]"):
        head_patched_metrics(prepared, batch, prompt_set.recordings[0], torch.tensor([1, 2]))
