"""Edge patching, many masks per forward (`edge_patched_metrics`) and the removed input each reader gets
(`layout.removed_input`): equal to brute force and to one pass per mask on tiny dense and gated Llamas, in both
gate modes, by component and by token role, for any number of copies per forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from circuits.config import CircuitError, ComponentCircuitConfig
from circuits.curves import PromptSet, edge_curve, read_curve
from circuits.hooks import edge_attribution, edge_patched_metrics, patched_metric, prepare, record
from circuits.layout import removed_input, top_k_mask, top_k_masks
from prompts.batches import encode_prompts
from prompts.tasks import TASK_ROLES
from sparse_attention import hook_points
from sparse_attention.models import byte_tokenizer
from tests.test_circuits import batches_of, make_model, mixed_length_prompts, one_length_prompts, role_ids

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("hf", "recomputed"), ("gated", "recomputed"), ("gated", "frozen")]


@pytest.fixture(scope="module")
def prompts():
    """Six Greater-Than prompts of one byte length, as in test_circuits."""
    return one_length_prompts(60, 6)


def masks_of(allowed: torch.Tensor, seed: int) -> torch.Tensor:
    """[7, ...] masks over `allowed` ([U, V] or [U, V, R]): none kept, all kept, all but one, one, and random
    subsets of about 2%, 50% and 98% (both of removed_input's sides, gathered rows or not)."""
    generator = torch.Generator().manual_seed(seed)
    flat = allowed.flatten().nonzero().squeeze(1)
    all_but_one, one = allowed.clone(), torch.zeros_like(allowed)
    all_but_one.view(-1)[flat[len(flat) // 3]] = False
    one.view(-1)[flat[len(flat) // 2]] = True
    randoms = [allowed & (torch.rand(allowed.shape, generator=generator) < share) for share in (0.02, 0.5, 0.98)]
    return torch.stack([torch.zeros_like(allowed), allowed, all_but_one, one, *randoms])


def test_removed_input_is_the_sum_of_the_removed_writers_differences():
    generator = torch.Generator().manual_seed(0)
    n_copies, n_rows, n_cols, n, d = 3, 9, 5, 4, 6
    diffs = torch.randn(n_copies, n_rows, n, d, generator=generator, dtype=torch.float64)
    prefix = diffs.sum(1)
    for share in (0.0, 0.01, 0.05, 0.3, 0.7, 0.95, 0.99, 1.0):  # both sides, few rows gathered or not
        kept = torch.rand(n_copies, n_rows, n_cols, generator=generator) < share
        kept[0, :, 0] = True  # a column with nothing removed in one copy
        expected = torch.einsum("kubd,kuc->kcbd", diffs, (~kept).double())  # brute force: sum over removed rows
        got = removed_input(prefix, diffs, kept)
        # the first U' = 7 writers only (diffs holds more rows: later writers the readers cannot read)
        first = removed_input(diffs[:, :7].sum(1), diffs, kept[:, :7])
        if not bool(kept[:, :7].all()):
            torch.testing.assert_close(first, torch.einsum("kubd,kuc->kcbd", diffs[:, :7], (~kept[:, :7]).double()),
                                       rtol=0, atol=1e-12)
        if bool(kept.all()):
            assert got is None  # nothing removed: every input unchanged
        else:
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert removed_input(prefix, diffs, torch.ones(n_copies, n_rows, n_cols, dtype=torch.bool)) is None


@pytest.mark.parametrize("kind,gates", CASES)
@pytest.mark.parametrize("max_tokens", [1, 60, 10_000])  # one copy, a few, every mask in one forward
def test_batched_edge_patching_equals_one_pass_per_mask(kind, gates, max_tokens, prompts):
    prepared = prepare(make_model(kind), gates=gates)
    keeps = masks_of(prepared.layout.allowed(), seed=1)
    for batch in batches_of(prompts):
        masks = PromptSet(prepared, [batch]).masks[0]
        with prepared.gates_of(masks):
            corrupted, _ = record(prepared, batch.corrupted)
        expected = torch.stack([patched_metric(prepared, batch, corrupted, masks, keep_edges=keep) for keep in keeps])
        assert (expected[0] - expected[1]).abs().max() > 1e-3  # informative
        torch.testing.assert_close(edge_patched_metrics(prepared, batch, corrupted, keeps, masks, max_tokens=max_tokens),
                                   expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,gates", CASES)
def test_batched_role_edge_patching_equals_one_pass_per_mask(kind, gates, prompts):
    prepared = prepare(make_model(kind), gates=gates)
    roles = ["bos", *TASK_ROLES["greater_than"]]
    allowed = prepared.layout.allowed()[:, :, None].expand(-1, -1, len(roles))
    keeps = masks_of(allowed, seed=2)
    for batch in batches_of(mixed_length_prompts(prompts)):
        token_roles = role_ids(batch, roles)
        masks = PromptSet(prepared, [batch]).masks[0]
        with prepared.gates_of(masks):
            corrupted, _ = record(prepared, batch.corrupted)
        expected = torch.stack([patched_metric(prepared, batch, corrupted, masks, keep_edges=keep,
                                               token_roles=token_roles) for keep in keeps])
        for max_tokens in (1, 10_000):
            torch.testing.assert_close(edge_patched_metrics(prepared, batch, corrupted, keeps, masks, token_roles,
                                                            max_tokens), expected, rtol=0, atol=1e-6)


def test_batched_edge_patching_refuses_bad_masks(prompts):
    prepared = prepare(make_model("hf"))
    batch = batches_of(prompts)[0]
    corrupted, _ = record(prepared, batch.corrupted)
    with pytest.raises(CircuitError, match=r"keeps must be \[K, U, V\]"):
        edge_patched_metrics(prepared, batch, corrupted, prepared.layout.allowed())
    by_role = prepared.layout.allowed()[None, :, :, None].expand(2, -1, -1, 3)
    with pytest.raises(CircuitError, match="need token_roles"):
        edge_patched_metrics(prepared, batch, corrupted, by_role)


def test_read_curve_evaluates_the_same_counts_in_batches():
    """With evaluate_many the grid and the dense counts are one call each; readings and points are unchanged."""
    curve = {k: min(1.0, k / 40) - (0.2 if k in (23, 24, 31) else 0.0) for k in range(101)}
    single = read_curve(curve.__getitem__, [0, 1, 3, 10, 30, 100], 0.5, dense_points=5)
    calls = []

    def many(counts: list[int]) -> list[float]:
        calls.append(counts)
        return [curve[k] for k in counts]

    assert read_curve(curve.__getitem__, [0, 1, 3, 10, 30, 100], 0.5, dense_points=5, evaluate_many=many) == single
    assert calls[0] == [0, 1, 3, 10, 30, 100] and len(calls[1]) > 1  # the grid, then the dense counts at once


@pytest.mark.parametrize("by_role", [False, True])
def test_edge_curve_is_the_same_for_any_number_of_copies_per_forward(by_role, prompts):
    prepared = prepare(make_model("gated"), gates="frozen")
    prompt_set = PromptSet(prepared, encode_prompts(mixed_length_prompts(prompts), byte_tokenizer(), 4))
    scores = prompt_set.edge_scores(by_role, ig_steps=2)
    metric_clean = prompt_set.prompt_clean.mean().item()
    curves = [edge_curve(prompt_set, scores, metric_clean, ComponentCircuitConfig(curve_points=6, dense_points=4,
                                                                                    edge_batch_tokens=tokens))
              for tokens in (1, 10_000)]
    assert curves[0].counts == curves[1].counts and curves[0].carrying == curves[1].carrying
    assert curves[0].count_at_target == curves[1].count_at_target
    torch.testing.assert_close(torch.tensor(curves[0].prompt_metrics), torch.tensor(curves[1].prompt_metrics),
                               rtol=0, atol=1e-6)


def test_top_k_masks_sorts_once_for_every_k():
    scores = torch.tensor([[0.5, -2.0, 0.5], [1.0, 0.0, -0.5]])
    allowed = torch.tensor([[True, True, False], [True, True, True]])
    masks = top_k_masks(scores, allowed)
    for k in range(8):
        assert torch.equal(masks(k), top_k_mask(scores, allowed, k))
    assert masks(2).tolist() == [[False, True, False], [True, False, False]]
    assert masks(4).tolist() == [[True, True, False], [True, False, True]]  # ties: lower flat index first
    assert torch.equal(masks(7), allowed)


class SharedThenPerHead:
    """The split input as it was: the projection runs on the shared input, then a replacement's per-head
    projection of every head takes its place (the reference the patched forward must keep matching)."""

    def __init__(self, fn, norm, head_dim):
        self.fn, self.norm, self.head_dim, self.resid = fn, norm, head_dim, None

    def attach(self, projection):
        return [self.norm.register_forward_pre_hook(self._keep_input), projection.register_forward_hook(self._replace)]

    def _keep_input(self, module, args):
        self.resid = args[0]

    def _replace(self, module, args, output):
        b, p, d = self.resid.shape
        resid = self.resid[:, :, None, :].expand(b, p, output.shape[-1] // self.head_dim, d)
        new = self.fn(resid)
        if new is None:
            return None
        if isinstance(new, hook_points.HeadInputs):  # some heads' inputs: every head's, the others unchanged
            new, some = resid.clone(), new
            new[:, :, some.heads] = some.inputs
        return hook_points.per_head_projection(self.norm.forward(new), module.weight, module.bias).to(output.dtype)


@pytest.mark.parametrize("kind,gates", CASES)
def test_patched_forward_equals_the_shared_then_per_head_projection(kind, gates, prompts, monkeypatch):
    """Edge-patched metrics (by component and by role) and EAP-IG scores equal those of the old split input to 1e-6."""
    prepared = prepare(make_model(kind), gates=gates)
    roles = ["bos", *TASK_ROLES["greater_than"]]
    keeps = masks_of(prepared.layout.allowed(), seed=3)
    role_keeps = masks_of(prepared.layout.allowed()[:, :, None].expand(-1, -1, len(roles)), seed=4)

    def outputs():
        got = []
        for batch in batches_of(mixed_length_prompts(prompts)):
            token_roles = role_ids(batch, roles)
            masks = PromptSet(prepared, [batch]).masks[0]
            with prepared.gates_of(masks):
                corrupted, _ = record(prepared, batch.corrupted)
            got += [edge_patched_metrics(prepared, batch, corrupted, keeps, masks),
                    edge_patched_metrics(prepared, batch, corrupted, role_keeps, masks, token_roles),
                    edge_attribution(prepared, batch, corrupted, masks=masks, ig_steps=2)]
        return got

    new = outputs()
    monkeypatch.setattr(hook_points, "_SplitInput", SharedThenPerHead)
    old = outputs()
    assert (old[0][0] - old[0][1]).abs().max() > 1e-3  # informative
    for got, expected in zip(new, old, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_a_replaced_split_input_computes_its_projection_once(prompts, monkeypatch):
    """With every edge removed every head's q, k and v input is replaced: the shared projections never run."""
    prepared = prepare(make_model("hf"))
    projections = {id(hook_points.module(prepared.module, f"blocks.{layer}.attn.{kind}"))
                   for layer in range(prepared.layout.n_layers) for kind in "qkv"}
    calls = []
    linear_forward = nn.Linear.forward

    def counted(self, x):
        calls.append(id(self) in projections)
        return linear_forward(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counted)
    batch = batches_of(prompts)[0]
    corrupted, _ = record(prepared, batch.corrupted)
    assert sum(calls) == len(projections)  # recording: each projection once, on the shared input
    calls.clear()
    patched_metric(prepared, batch, corrupted, keep_edges=torch.zeros_like(prepared.layout.allowed()))
    assert calls and not any(calls)
