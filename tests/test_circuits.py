"""Component circuits on tiny Llamas (plain HF, gated model in dense mode, gated with about half the gates
shut): exact patching identities, a hand-built one-head circuit, and EAP = patching where it is linear.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from circuits.config import CircuitError, ComponentCircuitConfig
from circuits.curves import (
    CircuitResult,
    Curve,
    PromptSet,
    compare,
    compare_per_prompt,
    count_grid,
    count_staying_above,
    first_crossing,
    head_curve,
    head_scores,
    read_curve,
    readings,
    run,
    run_per_prompt,
)
from circuits.hooks import ComponentHooks, edge_attribution, patched_metric, prepare, record
from circuits.layout import ComponentLayout, column_rows, live_edges, live_role_edges, top_k_mask
from circuits.stats import spearman
from prompts.batches import PromptBatch, encode_prompts
from prompts.metrics import logit_diff, logits_fn
from prompts.tasks import TASK_ROLES, TaskPrompt, generate_task
from sparse_attention.gated_attention import GatedModel, GateError
from sparse_attention.hook_points import hf_model
from sparse_attention.models import TinyModelConfig, byte_tokenizer, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = TinyModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=1)
KINDS = ("hf", "dense", "gated")


def amplify(model) -> None:
    """Scale up the random init (std 0.02) so attention is peaked and corruption effects are not tiny."""
    for layer in model.model.layers:
        for linear, scale in ((layer.self_attn.q_proj, 2.0), (layer.self_attn.k_proj, 2.0),
                              (layer.self_attn.o_proj, 8.0), (layer.mlp.down_proj, 8.0)):
            linear.weight.mul_(scale)


def make_model(kind: str, edit=None, config: TinyModelConfig = TINY):
    """'hf': the HF model; 'dense': GatedModel with gates off; 'gated': hard gates, offsets -0.3..0.3.
    Weights are amplified, then `edit(hf_model)` changes them before wrapping."""
    model, _ = tiny_model(config)
    with torch.no_grad():
        amplify(model)
        if edit is not None:
            edit(model)
    if kind == "hf":
        return model
    gated = GatedModel(model, offset_init=0.0).eval()
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.3, 0.3, gated.offsets.numel()).view_as(gated.offsets))
    return gated.set_mode("dense" if kind == "dense" else "eval")


def one_length_prompts(n_candidates: int, n: int) -> list[TaskPrompt]:
    """The first `n` of `n_candidates` Greater-Than prompts (seed 0) that have the most common byte length, so a
    batch holds several prompts."""
    candidates = generate_task("greater_than", byte_tokenizer(), n_candidates, seed=0)
    lengths = [len(p.clean) for p in candidates]
    common = max(set(lengths), key=lengths.count)
    return [p for p in candidates if len(p.clean) == common][:n]


@pytest.fixture(scope="module")
def prompts():
    """Six Greater-Than prompts of one byte length (so batches hold several prompts)."""
    return one_length_prompts(60, 6)


def batches_of(prompts, batch_size: int = 4):
    return encode_prompts(prompts, byte_tokenizer(), batch_size)


def reference_metric(model, batch, ids) -> torch.Tensor:
    with torch.no_grad():
        return logit_diff(logits_fn(model)(ids)[:, -1], batch)


@pytest.mark.parametrize("kind", KINDS)
def test_multi_head_copy_is_the_same_function(kind, prompts):
    model = make_model(kind)
    prepared = prepare(model)
    batch = batches_of(prompts)[0]
    with torch.no_grad():
        torch.testing.assert_close(prepared.forward(batch.clean), logits_fn(model)(batch.clean), rtol=0, atol=1e-5)
    hf = hf_model(model)
    assert hf.model.layers[0].self_attn.k_proj.out_features == 16  # the original keeps its 2 KV heads
    assert prepared.hf.model.layers[0].self_attn.k_proj.out_features == 32


@pytest.mark.parametrize("kind", KINDS)
def test_edge_patching_endpoints_are_the_clean_and_corrupted_runs(kind, prompts):
    model = make_model(kind)
    prepared = prepare(model)
    allowed = prepared.layout.allowed()
    for batch in batches_of(prompts):
        corrupted, _ = record(prepared, batch.corrupted)
        clean = reference_metric(model, batch, batch.clean)
        corrupt = reference_metric(model, batch, batch.corrupted)
        assert (clean - corrupt).abs().max() > 1e-3  # informative
        torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=allowed), clean,
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=~allowed), corrupt,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("split_qkv", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_removing_every_input_edge_of_a_node_is_patching_the_node(kind, split_qkv, prompts):
    """A node whose every incoming edge is removed reads the corrupted residual, so it writes its
    corrupted output: edge patching (per-head inputs) and node patching (o_proj input) must agree."""
    prepared = prepare(make_model(kind), split_qkv)
    layout = prepared.layout
    batch = batches_of(prompts)[0]
    corrupted, _ = record(prepared, batch.corrupted)
    clean = patched_metric(prepared, batch, corrupted)
    head_cols = layout.head_cols(1)
    per_head = layout.n_inputs
    for head in range(layout.n_heads):
        keep_edges = layout.allowed().clone()
        keep_edges[:, head_cols.start + head * per_head: head_cols.start + (head + 1) * per_head] = False
        keep_heads = torch.ones(layout.n_layers, layout.n_heads, dtype=torch.bool)
        keep_heads[1, head] = False
        by_edges = patched_metric(prepared, batch, corrupted, keep_edges=keep_edges)
        by_node = patched_metric(prepared, batch, corrupted, keep_heads=keep_heads)
        torch.testing.assert_close(by_edges, by_node, rtol=0, atol=1e-5)
    assert (by_node - clean).abs().max() > 1e-4  # the last head patched changes the metric
    keep_edges = layout.allowed().clone()
    keep_edges[:, layout.mlp_col(0)] = False
    keep_mlps = torch.tensor([False, True])
    torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=keep_edges),
                               patched_metric(prepared, batch, corrupted, keep_mlps=keep_mlps), rtol=0, atol=1e-5)


def o_proj_input(prepared, layer: int, ids: torch.Tensor, edit=None) -> torch.Tensor:
    """Layer `layer`'s o_proj input [b, p, H * dh] in a plain forward, with `edit` = (module, hook) added."""
    saved = {}
    attn = prepared.hf.model.layers[layer].self_attn
    handles = [attn.o_proj.register_forward_pre_hook(lambda m, args: saved.update(z=args[0].detach()))]
    if edit is not None:
        handles.append(edit[0].register_forward_hook(edit[1]))
    try:
        with torch.no_grad():
            prepared.forward(ids)
    finally:
        for handle in handles:
            handle.remove()
    return saved["z"]


@pytest.mark.parametrize("kind", ["hf", "gated"])
def test_removing_the_q_k_or_v_edges_of_a_head_patches_that_projection(kind, prompts):
    """All edges into one head's q (k, v) input removed = that head's query (key, value) taken from the
    corrupted run: the head outputs at every position match plain forward hooks on the projections."""
    prepared = prepare(make_model(kind))
    layout = prepared.layout
    batch = batches_of(prompts)[0]
    corrupted, _ = record(prepared, batch.corrupted)
    layer, head_dim = 1, TINY.d_model // TINY.n_heads
    clean_z = o_proj_input(prepared, layer, batch.clean)
    changes = torch.zeros(3, layout.n_heads)
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        projection = getattr(prepared.hf.model.layers[layer].self_attn, name)
        saved = {}
        o_proj_input(prepared, layer, batch.corrupted, (projection, lambda m, a, out, s=saved: s.update(out=out)))
        for head in range(layout.n_heads):
            cols = slice(head * head_dim, (head + 1) * head_dim)

            def swap(module, args, out, cols=cols, corrupted_out=saved["out"]):
                out = out.clone()
                out[..., cols] = corrupted_out[..., cols]
                return out

            reference = o_proj_input(prepared, layer, batch.clean, (projection, swap))
            keep = layout.allowed().clone()
            keep[:, layout.head_cols(layer).start + head * 3 + index] = False
            hooks = ComponentHooks(layout, corrupted=corrupted, keep_edges=keep)
            with hooks.attached(prepared.hf), torch.no_grad():
                prepared.forward(batch.clean)
            torch.testing.assert_close(hooks.z[layer], reference, rtol=0, atol=1e-5)
            changes[index, head] = (reference - clean_z).abs().max()
    assert (changes.max(dim=1).values > 1e-4).all()  # q, k and v each matter (10x the tolerance)


def only_head_1_2_writes(model):
    """Zero every head's o_proj columns except layer 1 head 2, which is scaled up."""
    for index, layer in enumerate(model.model.layers):
        weight = layer.self_attn.o_proj.weight.view(TINY.d_model, TINY.n_heads, -1)
        for head in range(TINY.n_heads):
            weight[:, head] *= 10.0 if (index, head) == (1, 2) else 0.0


@pytest.mark.parametrize("kind", ["hf", "gated"])
def test_patching_finds_a_hand_built_one_head_circuit(kind, prompts):
    model = make_model(kind, only_head_1_2_writes)
    config = ComponentCircuitConfig(curve_points=4, top_stored=3)
    result = run(config, model, byte_tokenizer(), prompts)
    assert result.heads.top[0][0] == "blocks.1.head.2"
    assert len(result.dead_heads) == 7 and "blocks.1.head.2" not in result.dead_heads  # they write nothing
    assert result.heads.total == 1 and len(result.heads.top) == 1
    assert result.heads.count_at_target == 1
    effects = dict(zip(result.heads.counts, result.heads.effects))
    assert effects[0] == 0.0 and effects[1] == pytest.approx(1.0, abs=1e-5)
    assert abs(result.heads.metric_full - result.heads.metric_empty) > 1e-3


def linear_after_last_heads(model):
    """Final norm -> identity and the last MLP writes nothing, so the metric is linear in every write
    that the logits read directly and in the last layer's head outputs."""
    model.model.norm = nn.Identity()
    model.model.layers[-1].mlp.down_proj.weight.zero_()
    model.model.embed_tokens.weight.mul_(10.0)  # tied: also scales the unembedding; without the norm,
    # logits would otherwise be tiny


@pytest.mark.parametrize("kind", ["hf", "gated"])
def test_eap_equals_patching_where_the_metric_is_linear(kind, prompts):
    prepared = prepare(make_model(kind, linear_after_last_heads))
    layout = prepared.layout
    for batch in batches_of(prompts):
        corrupted, _ = record(prepared, batch.corrupted)
        scores = edge_attribution(prepared, batch, corrupted)  # summed over the batch
        clean = patched_metric(prepared, batch, corrupted).sum()
        effects = torch.zeros(layout.n_rows)
        for row in range(layout.n_rows):
            keep = layout.allowed().clone()
            keep[row, layout.logits_col] = False
            effects[row] = patched_metric(prepared, batch, corrupted, keep_edges=keep).sum() - clean
        assert effects.abs().max() > 1e-3
        torch.testing.assert_close(scores[:, layout.logits_col], effects, rtol=0, atol=2e-5)
        last = layout.n_layers - 1
        node_scores = head_scores(scores, layout)[last]
        for head in range(layout.n_heads):
            keep_heads = torch.ones(layout.n_layers, layout.n_heads, dtype=torch.bool)
            keep_heads[last, head] = False
            effect = patched_metric(prepared, batch, corrupted, keep_heads=keep_heads).sum() - clean
            torch.testing.assert_close(node_scores[head], effect, rtol=0, atol=2e-5)


def test_eap_is_zero_for_edges_that_do_not_exist(prompts):
    prepared = prepare(make_model("gated"))
    batch = batches_of(prompts)[0]
    corrupted, _ = record(prepared, batch.corrupted)
    scores = edge_attribution(prepared, batch, corrupted)
    assert scores[~prepared.layout.allowed()].abs().max() == 0
    assert scores[prepared.layout.allowed()].abs().max() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_straight_through_gate_gradient_changes_only_what_passes_through_gates(kind, prompts):
    """The straight-through pass has the hard gates' forward values; its EAP scores differ from plain EAP
    only on a gated model, and never on edges into the logits (which no gate lies on)."""
    model = make_model(kind)
    plain, straight = prepare(model), prepare(model, gate_gradient="straight_through")
    batch = batches_of(prompts)[0]
    corrupted, _ = record(plain, batch.corrupted)
    with straight.gradient_gates():
        torch.testing.assert_close(straight.forward(batch.clean), plain.forward(batch.clean), rtol=0, atol=0)
    assert not isinstance(straight.module, GatedModel) or straight.module.mode == model.mode  # restored
    scores = {name: edge_attribution(prepared, batch, corrupted) for name, prepared in
              (("plain", plain), ("straight", straight))}
    logits_col = plain.layout.logits_col
    torch.testing.assert_close(scores["straight"][:, logits_col], scores["plain"][:, logits_col], rtol=1e-6, atol=1e-7)
    heads = plain.layout.head_cols(1)
    changed = (scores["straight"][:, heads] - scores["plain"][:, heads]).abs().max()
    assert (changed > 1e-5) if kind == "gated" else (changed == 0)


def mixed_length_prompts(prompts):
    """The fixture's prompts plus Greater-Than prompts of another byte length (two batches, two widths)."""
    others = [p for p in generate_task("greater_than", byte_tokenizer(), 60, seed=0)
              if len(p.clean) != len(prompts[0].clean)]
    return prompts[:3] + others[:3]


def role_ids(batch, roles: list[str]) -> torch.Tensor:
    """[b, p] each token's index into `roles`."""
    return torch.tensor([[roles.index(role) for role in prompt] for prompt in batch.roles])


@pytest.mark.parametrize("kind", ["hf", "gated"])
def test_role_edges_kept_for_every_role_are_component_edges(kind, prompts):
    """A per-role mask that repeats one [U, V] mask for every role patches exactly as that mask; a role mask
    patches exactly as the per-position mask it gives each prompt; the logits read only the `end` token."""
    prepared = prepare(make_model(kind))
    layout = prepared.layout
    allowed = layout.allowed()
    keep = allowed & (torch.rand(allowed.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    roles = ["bos", *TASK_ROLES["greater_than"]]
    by_role = allowed[:, :, None] & (torch.rand(*allowed.shape, len(roles), generator=torch.Generator().manual_seed(1))
                                     < 0.5)
    for batch in batches_of(mixed_length_prompts(prompts)):
        corrupted, _ = record(prepared, batch.corrupted)
        token_roles = role_ids(batch, roles)
        repeated = keep[:, :, None].expand(-1, -1, len(roles))
        torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=repeated,
                                                  token_roles=token_roles),
                                   patched_metric(prepared, batch, corrupted, keep_edges=keep), rtol=0, atol=1e-6)
        metric = patched_metric(prepared, batch, corrupted, keep_edges=by_role, token_roles=token_roles)
        for i, prompt_roles in enumerate(token_roles):  # brute force: one prompt, its positions as the roles
            one = PromptBatch(batch.clean[i:i + 1], batch.corrupted[i:i + 1], batch.answer_ids[i:i + 1],
                              batch.answer_weights[i:i + 1], batch.indices[i:i + 1], batch.roles[i:i + 1])
            one_corrupted, _ = record(prepared, one.corrupted)
            positions = torch.arange(len(prompt_roles))[None]
            torch.testing.assert_close(patched_metric(prepared, one, one_corrupted,
                                                      keep_edges=by_role[:, :, prompt_roles], token_roles=positions),
                                       metric[i:i + 1], rtol=0, atol=1e-6)
        early = allowed[:, :, None].expand(-1, -1, len(roles)).clone()
        early[:, layout.logits_col, roles.index("end")] = False
        no_logits = allowed.clone()
        no_logits[:, layout.logits_col] = False
        without_end = patched_metric(prepared, batch, corrupted, keep_edges=early, token_roles=token_roles)
        torch.testing.assert_close(without_end, patched_metric(prepared, batch, corrupted, keep_edges=no_logits),
                                   rtol=0, atol=1e-6)
        with pytest.raises(CircuitError, match="need token_roles"):
            patched_metric(prepared, batch, corrupted, keep_edges=early)
        with pytest.raises(CircuitError, match=rf"indices of the 3 roles but hold 0\.\.{token_roles.max().item()}$"):
            patched_metric(prepared, batch, corrupted, keep_edges=early[:, :, :3], token_roles=token_roles)
        with pytest.raises(CircuitError, match="need n_roles"):
            edge_attribution(prepared, batch, corrupted, token_roles)


@pytest.mark.parametrize("kind", ["hf", "gated"])
def test_role_scores_are_the_sum_of_the_position_scores_they_pool(kind, prompts):
    """Brute force: each prompt alone, scored per token position, its positions summed into their roles and
    averaged over prompts, is the prompt set's role-resolved score (EAP and EAP-IG); where the metric is
    linear the logits' edges at `end` equal patching them."""
    prepared = prepare(make_model(kind, linear_after_last_heads))
    layout = prepared.layout
    mixed = mixed_length_prompts(prompts)
    prompt_set = PromptSet(prepared, batches_of(mixed))
    assert len({b.clean.shape[1] for b in prompt_set.batches}) > 1 and len({p.template for p in mixed}) > 1
    roles = prompt_set.roles
    assert roles[0] == "bos" and set(roles) == {"bos", *TASK_ROLES["greater_than"]}
    for ig_steps in (None, 2):
        by_role = prompt_set.edge_scores(by_role=True, ig_steps=ig_steps)  # [U, V, R]
        assert by_role.shape == (layout.n_rows, layout.n_cols, len(roles))
        expected = torch.zeros_like(by_role)
        for one in batches_of(mixed, batch_size=1):
            corrupted, _ = record(prepared, one.corrupted)
            positions = torch.arange(one.clean.shape[1])
            per_position = edge_attribution(prepared, one, corrupted, positions[None], ig_steps=ig_steps,
                                            n_roles=len(positions))  # [U, V, p]
            for position, role in enumerate(one.roles[0]):
                expected[:, :, roles.index(role)] += per_position[:, :, position]
        torch.testing.assert_close(by_role, expected / len(mixed), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(by_role.sum(-1), prompt_set.edge_scores(ig_steps=ig_steps), rtol=1e-5, atol=1e-6)
    end = roles.index("end")
    others = [i for i in range(len(roles)) if i != end]
    assert by_role[:, layout.logits_col, others].abs().max() == 0  # the metric reads the last token only
    assert by_role[:, layout.head_cols(1), others].abs().max() > 0  # heads read every token
    clean = prompt_set.mean_metric()
    allowed = layout.allowed()[:, :, None].expand(by_role.shape)
    effects = []
    for row in (0, layout.head_row(1, 2), layout.mlp_row(0)):  # the metric is linear in what the logits read
        keep = allowed.clone()
        keep[row, layout.logits_col, end] = False
        effects.append(prompt_set.mean_metric(keep_edges=keep) - clean)
        assert by_role[row, layout.logits_col, end].item() == pytest.approx(effects[-1], abs=2e-5)
    assert max(map(abs, effects)) > 1e-3


def test_mixed_templates_share_role_labels(prompts):
    """Greater-Than prompts of different templates and lengths: the same role is the same index in every
    prompt, on the tokens that play that part (the start year's tens digit, the last token)."""
    mixed = mixed_length_prompts(prompts)
    assert len({p.template for p in mixed}) > 1
    prompt_set = PromptSet(prepare(make_model("hf")), batches_of(mixed))
    tens, end = prompt_set.roles.index("start_tens"), prompt_set.roles.index("end")
    for batch, token_roles in zip(prompt_set.batches, prompt_set.token_roles):
        for i, index in enumerate(batch.indices):
            prompt = mixed[index]
            assert token_roles[i, -1] == end and (token_roles[i] == tens).sum() == 1
            digit = byte_tokenizer().decode(batch.clean[i, token_roles[i] == tens])
            assert digit == str(int(prompt.correct[0]) - 1)  # the correct answers are the digits above the tens


def test_layout_indices():
    layout = ComponentLayout(n_layers=2, n_heads=3, split_qkv=True)
    assert (layout.n_rows, layout.n_cols) == (9, 2 * (9 + 1) + 1)
    rows, cols = layout.row_names(), layout.col_names()
    assert rows[layout.head_row(1, 2)] == "blocks.1.head.2" and rows[layout.mlp_row(0)] == "blocks.0.mlp"
    assert cols[layout.head_cols(1).start + 2 * 3 + 1] == "blocks.1.head.2.k" and cols[-1] == "logits"
    allowed = layout.allowed()
    assert allowed[layout.head_row(0, 1), layout.mlp_col(0)]  # a head feeds its own layer's MLP
    assert not allowed[layout.head_row(0, 1), layout.head_cols(0).start]  # but not its own layer's heads
    assert not allowed[layout.mlp_row(0), layout.mlp_col(0)] and allowed[layout.mlp_row(0), layout.head_cols(1)].all()
    assert allowed[:, -1].all()


def test_read_curve_bisects_a_monotone_curve_to_one_count():
    calls = []

    def effect(k: int) -> float:
        calls.append(k)
        return min(1.0, k / 37)

    grid = count_grid(100, 6)
    assert grid[0] == 0 and grid[-1] == 100 and grid == sorted(set(grid))
    first, stays, effects = read_curve(effect, grid, 0.9)
    assert first == stays == 34 and effects[34] >= 0.9 > effects[33]
    assert len(calls) == len(set(calls))  # no count evaluated twice
    first, _, _ = read_curve(effect, grid, 0.9, refine=False)
    assert first == min(k for k in grid if k >= 34)
    assert read_curve(lambda k: 0.5, grid, 0.9)[:2] == (None, None)


def test_read_curve_on_a_non_monotone_curve_reads_first_crossing_and_stays_above_densely():
    """A hand-made curve: a spike to 0.95 at 10, back under the target up to 60, above from 61 on, one dip at
    80. The geometric grid misses the spike and the dip; the dense grid and bisection find both readings
    exactly, and every count between the stays-above count and the total that was evaluated reaches it."""
    def effect(k: int) -> float:
        if k == 10:
            return 0.95
        if k == 80:
            return 0.5
        return 0.92 if k >= 61 else 0.3 + 0.5 * k / 60

    grid = [0, 1, 3, 9, 27, 100]
    first, stays, effects = read_curve(effect, grid, 0.9, dense_points=0)
    assert (first, stays) == (61, 61)  # bisection below the first grid crossing (100) finds 61; 80 never seen
    first, stays, effects = read_curve(effect, grid, 0.9, dense_points=100)  # every count from 27 to 100
    assert first == 61 and stays == 81 and effects[80] == 0.5
    assert all(effects[k] >= 0.9 for k in effects if k >= stays) and effects[stays - 1] < 0.9
    evaluated = {0: 0.0, 1: 0.95, 2: 0.5, 4: 0.91, 8: 0.85, 16: 0.92, 32: 1.0}
    assert first_crossing(evaluated, 0.9) == 1 and count_staying_above(evaluated, 0.9) == 16
    assert count_staying_above({0: 0.0, 5: 0.8}, 0.9) is None


def test_readings_re_read_a_curve_on_resampled_prompts():
    """Two prompts: the first reaches the target at count 2, the second only at 4 (after a dip at 3). Each
    resample is read like its mean curve; carrying units are reported."""
    metrics = np.array([[0.0, 0.0], [0.5, 0.0], [1.0, 0.5], [1.0, 0.0], [1.0, 1.0]])  # [C, n], full = 1
    counts, carrying = [0, 1, 2, 3, 4], [0, 10, 20, 30, 40]
    first, stays = readings(metrics, counts, carrying, 0.9, np.array([[0, 0], [1, 1], [0, 1]]))
    assert first.tolist() == [20, 40, 40] and stays.tolist() == [20, 40, 40]
    first, stays = readings(metrics, counts, carrying, 0.7, np.array([[0, 1]]))
    assert first.tolist() == [20] and stays.tolist() == [40]  # mean 0.75 at 2, 0.5 at 3


def test_top_k_mask_ranks_by_magnitude_within_allowed():
    scores = torch.tensor([[0.1, -3.0], [2.0, 5.0]])
    allowed = torch.tensor([[True, True], [True, False]])
    assert top_k_mask(scores, allowed, 2).tolist() == [[False, True], [True, False]]
    assert top_k_mask(scores, allowed, 3).sum() == 3 and not top_k_mask(scores, allowed, 4)[1, 1]


DOES_ANY_TASK = {"min_clean_logit_diff": -1e9, "min_clean_accuracy": 0.0}  # tiny random models fail any behaviour gate


def test_run_gives_normalised_curves_and_a_comparison(prompts):
    config = ComponentCircuitConfig(curve_points=4, refine=False, bootstrap_samples=200, precision="fp32",
                                    **DOES_ANY_TASK)  # exact endpoints
    dense = run(config, make_model("dense"), byte_tokenizer(), prompts)
    sparse = run(config, make_model("gated"), byte_tokenizer(), prompts)
    for result in (dense, sparse):
        assert result.n_prompts == len(prompts)
        for curve in (result.heads, result.edges):
            effects = dict(zip(curve.counts, curve.effects))
            assert effects[0] == 0.0 and effects[curve.total] == pytest.approx(1.0, abs=1e-4)
        assert result.edges.metric_empty == pytest.approx(result.metric_corrupted, abs=1e-5)
        layout = ComponentLayout(2, 4, True)
        dead = torch.tensor([name in result.dead_heads for name in layout.row_names()])
        touching = dead[:, None] | torch.cat([dead, torch.tensor([False])])[column_rows(layout)][None, :]
        assert result.edges.total == int((layout.allowed() & ~touching).sum())
        assert result.roles[0] == "bos" and set(result.roles) <= {"bos", *TASK_ROLES["greater_than"]}
        assert result.role_edges.total == result.edges.total * len(result.roles)
        effects = dict(zip(result.role_edges.counts, result.role_edges.effects))
        assert effects[0] == 0.0 and effects[result.role_edges.total] == pytest.approx(1.0, abs=1e-4)
        writer, reader = result.role_edges.top[0][0].split(" -> ")
        assert writer.split("@")[1] == reader.split("@")[1] in result.roles
    comparison = compare(dense, sparse)
    assert comparison["behaviour_gate"] == "passed" and comparison["gates"] == "frozen"
    assert comparison["heads"]["ratio"] == dense.heads.count_at_target / sparse.heads.count_at_target
    low, high = comparison["edges"]["dense_first_ci"]
    assert low <= dense.edges.count_at_target <= high
    assert comparison["edges"]["sparse_stays_above"] == sparse.edges.count_stays_above
    assert comparison["role_edges"]["dense"] == dense.role_edges.count_at_target
    without = run(config.model_copy(update={"role_edges": False}), make_model("dense"), byte_tokenizer(), prompts)
    assert without.role_edges is None and "role_edges" not in compare(without, without)
    assert without.edges.counts == dense.edges.counts and without.edges.effects == pytest.approx(dense.edges.effects)
    assert set(result.to_json()) >= {"heads", "edges", "config", "metric_clean"}


def test_behaviour_gate_keeps_a_task_out_of_the_ratios(prompts):
    """Tiny random models do not do Greater-Than: with the default thresholds no ratio is given, and the
    gate says which model failed and why; the counts stay reported."""
    config = ComponentCircuitConfig(curve_points=3, refine=False, role_edges=False, faithfulness_edges=0,
                                    bootstrap_samples=50)
    dense = run(config, make_model("dense"), byte_tokenizer(), prompts)
    sparse = run(config, make_model("gated"), byte_tokenizer(), prompts)
    comparison = compare(dense, sparse)
    assert comparison["behaviour_gate"].startswith("dense: mean clean logit diff")
    assert comparison["heads"]["ratio"] is None and comparison["edges"]["ratio_stays_above"] is None
    assert comparison["heads"]["dense"] == dense.heads.count_at_target
    assert "ratio_first_ci" not in comparison["heads"] and "dense_first_ci" in comparison["heads"]
    assert comparison["behaviour"]["sparse"]["accuracy_clean"] == sparse.accuracy_clean


def test_bad_inputs_are_refused(prompts):
    gated = make_model("gated")
    with pytest.raises(CircuitError, match="train"):
        prepare(gated.set_mode("train"))
    prepared = prepare(make_model("hf"))
    small, *_ = batches_of(prompts, batch_size=1)
    big = batches_of(prompts, batch_size=4)[0]
    corrupted, _ = record(prepared, small.corrupted)
    if big.clean.shape != small.clean.shape:
        with pytest.raises(CircuitError, match="same shape"):
            patched_metric(prepared, big, corrupted, keep_edges=prepared.layout.allowed())
    with pytest.raises(CircuitError, match="one of"):
        ComponentHooks(prepared.layout, corrupted=corrupted, keep_heads=torch.ones(2, 4, dtype=torch.bool),
                       track_grads=True)
    with pytest.raises(CircuitError, match="at least one prompt"):
        run(ComponentCircuitConfig(), make_model("hf"), byte_tokenizer(), [])


def test_prompt_set_mean_metric_is_the_clean_metric(prompts):
    model = make_model("gated")
    prompt_set = PromptSet(prepare(model), batches_of(prompts, batch_size=2))
    expected = torch.cat([reference_metric(model, b, b.clean) for b in prompt_set.batches]).mean().item()
    assert prompt_set.mean_metric() == pytest.approx(expected, abs=1e-5)


def test_command_line_compares_dense_and_sparse_per_task(tmp_path):
    """The entry point on the committed Greater-Than prompts (digits and equal-length pairs are valid
    for the byte tokenizer too), tiny dense model vs a saved gated checkpoint."""
    import json

    from circuits.__main__ import main

    model, tokenizer = tiny_model(TinyModelConfig())
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.2, 0.2, gated.offsets.numel()).view_as(gated.offsets))
    gated.save(tmp_path / "sparse", tokenizer)
    out = tmp_path / "circuits.json"
    main(["--tasks", "greater_than", "--n", "3", "--dense", "tiny", "--sparse", str(tmp_path / "sparse"),
          "--points", "3", "--dense-points", "2", "--faithfulness-edges", "2", "--bootstrap", "50",
          "--no-role-edges", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["headline_gates"] == "frozen" and set(saved["tasks"]["greater_than"]) == {"frozen", "recomputed"}
    for mode, result in saved["tasks"]["greater_than"].items():
        assert result["dense"]["n_prompts"] == result["sparse"]["n_prompts"] == 3
        assert result["sparse"]["gates"] == mode and result["comparison"]["gates"] == mode
        assert set(result["comparison"]) == {"task", "target", "gates", "behaviour_gate", "behaviour", "heads", "edges"}
        assert set(result["comparison"]["edges"]) >= {"ratio", "ratio_stays_above", "dense_first_ci"}
        assert result["sparse"]["heads"]["metric_full"] != result["dense"]["heads"]["metric_full"]
    both = saved["tasks"]["greater_than"]
    assert both["frozen"]["dense"] == both["recomputed"]["dense"]  # no gates: one result for both modes


def sized(count_heads: int | None, count_edges: int) -> CircuitResult:
    """A CircuitResult whose curves say only how many heads / edges reach the target."""
    def curve(count):
        return Curve(10, [0, 10], [0.0, 1.0], count, count, 1.0, 0.0, [])
    return CircuitResult("t", 1, 1.0, 0.0, curve(count_heads), curve(count_edges), {}, None)


def test_compare_per_prompt_pairs_prompts_and_bootstraps_the_ratio_of_means():
    dense = [sized(4, 40), sized(6, 60), "no effect", sized(None, 10)]
    sparse = [sized(2, 10), sized(2, 20), sized(1, 1), sized(3, 5)]
    summary = compare_per_prompt(dense, sparse, samples=500)
    assert summary["n_prompts"] == 4 and "role_edges" not in summary
    heads, edges = summary["heads"], summary["edges"]
    assert heads["n_pairs"] == 2 and heads["dense_counts"] == [4, 6] and heads["sparse_counts"] == [2, 2]
    assert heads["ratio"] == 5 / 2 and heads["ci_low"] <= 2.5 <= heads["ci_high"]
    assert edges["n_pairs"] == 3 and edges["ratio"] == pytest.approx((40 + 60 + 10) / (10 + 20 + 5))
    assert compare_per_prompt(dense, sparse, samples=500) == summary  # seeded
    with pytest.raises(CircuitError, match="pair by prompt"):
        compare_per_prompt(dense, sparse[:3])


def test_run_per_prompt_is_one_circuit_per_prompt(prompts):
    config = ComponentCircuitConfig(curve_points=3, refine=False, role_edges=False, min_prompt_gap=0)
    model = make_model("gated")
    results = run_per_prompt(config, model, byte_tokenizer(), prompts[:2])
    assert [r.n_prompts for r in results] == [1, 1]
    alone = run(config, model, byte_tokenizer(), prompts[1:2])
    assert results[1].edges.counts == alone.edges.counts
    assert results[1].edges.effects == pytest.approx(alone.edges.effects)


# --------------------------------------------------------------------------------------------------
# Rankings that match the verification, frozen gates, and edges that carry signal


def swap_head_output(model, layer: int, head: int, corrupted_z: torch.Tensor):
    """A pre-hook on the original model's o_proj giving one head its corrupted input (independent of circuits)."""
    head_dim = TINY.d_model // TINY.n_heads
    o_proj = hf_model(model).model.layers[layer].self_attn.o_proj

    def swap(module, args):
        z = args[0].clone()
        z[..., head * head_dim:(head + 1) * head_dim] = corrupted_z[..., head * head_dim:(head + 1) * head_dim]
        return (z,)

    return o_proj.register_forward_pre_hook(swap)


def o_proj_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    saved = []
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: saved.append(a[0].detach()))
               for layer in hf_model(model).model.layers]
    try:
        with torch.no_grad():
            logits_fn(model)(ids)
    finally:
        for handle in handles:
            handle.remove()
    return saved


@pytest.mark.parametrize("kind,gates", [("hf", "recomputed"), ("gated", "recomputed"), ("gated", "frozen")])
def test_exact_head_ranking_equals_brute_force_patching(kind, gates, prompts):
    """Each head's exact score is the metric change when that head alone takes its corrupted output, computed
    here with plain hooks on the original model (frozen: under the clean run's gate masks, the corrupted run
    too); the heads curve ranks by it."""
    model = make_model(kind)
    prepared = prepare(model, gates=gates)
    prompt_set = PromptSet(prepared, batches_of(prompts))
    exact = prompt_set.head_patching_effects()
    brute = torch.zeros(TINY.n_layers, TINY.n_heads)
    for batch in prompt_set.batches:
        masks = None
        if gates == "frozen":
            with torch.no_grad():
                masks = model(input_ids=batch.clean, record_masks=True).gate_record.gate_masks
        frozen = model.frozen_gates(masks) if masks is not None else contextlib.nullcontext()
        with frozen:
            corrupted_z = o_proj_inputs(model, batch.corrupted)
            clean = reference_metric(model, batch, batch.clean)
            for layer in range(TINY.n_layers):
                for head in range(TINY.n_heads):
                    handle = swap_head_output(model, layer, head, corrupted_z[layer])
                    try:
                        brute[layer, head] += (reference_metric(model, batch, batch.clean) - clean).sum()
                    finally:
                        handle.remove()
    brute /= len(prompts)
    assert brute.abs().max() > 1e-3
    torch.testing.assert_close(exact, brute, rtol=0, atol=1e-5)
    config = ComponentCircuitConfig(curve_points=3, top_stored=8)
    curve = head_curve(prompt_set, exact, prompt_set.mean_metric(), config)
    live = ~prompt_set.dead_heads
    order = torch.sort(brute[live].abs(), descending=True, stable=True).values
    assert [abs(score) for _, score in curve.top] == pytest.approx(order.tolist(), abs=1e-5)


def embed_to_logits_only(model):
    """Every head and MLP writes nothing: the logits read the embedding alone, through the (nonlinear) norm."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def test_eap_ig_integrates_a_nonlinear_path_where_eap_does_not(prompts):
    """With the embedding as the logits' only input, patching the embed -> logits edge moves the metric by
    f(corrupted) - f(clean) through the final norm; EAP-IG over the embedding interpolation is a midpoint
    rule for that integral, EAP its one-sided linearisation."""
    prepared = prepare(make_model("hf", embed_to_logits_only))
    layout = prepared.layout
    pairs = [TaskPrompt(task="greater_than", template=0, clean=f"year 1{a}", corrupted=f"year 1{b}",
                        correct=("7",), incorrect=("2",), role_pieces=(("year", "other"), (f" 1{a}", "end_century")))
             for a, b in ("37", "58", "90")]
    batch = batches_of(pairs)[0]  # the last token differs: the logits read the embedding's difference there
    corrupted, _ = record(prepared, batch.corrupted)
    keep = layout.allowed().clone()
    keep[0, layout.logits_col] = False
    effect = (patched_metric(prepared, batch, corrupted, keep_edges=keep) - patched_metric(prepared, batch, corrupted)
              ).sum()
    eap = edge_attribution(prepared, batch, corrupted)[0, layout.logits_col]
    eap_ig = edge_attribution(prepared, batch, corrupted, ig_steps=64)[0, layout.logits_col]
    assert abs(effect) > 1e-2
    assert abs(eap_ig - effect) < 2e-3 * abs(effect)
    assert abs(eap - effect) > 10 * abs(eap_ig - effect)


@pytest.mark.parametrize("kind,gates", [("hf", "recomputed"), ("gated", "recomputed"), ("gated", "frozen")])
def test_eap_ig_equals_patching_where_the_metric_is_linear(kind, gates, prompts):
    prepared = prepare(make_model(kind, linear_after_last_heads), gates=gates)
    layout = prepared.layout
    prompt_set = PromptSet(prepared, batches_of(prompts))
    scores = prompt_set.edge_scores(ig_steps=3)
    clean = prompt_set.mean_metric()
    for row in range(layout.n_rows):
        keep = layout.allowed().clone()
        keep[row, layout.logits_col] = False
        assert scores[row, layout.logits_col].item() == pytest.approx(prompt_set.mean_metric(keep_edges=keep) - clean,
                                                                      abs=2e-5)
    last = layout.n_layers - 1
    torch.testing.assert_close(head_scores(scores, layout)[last], prompt_set.head_patching_effects()[last],
                               rtol=0, atol=2e-5)


def test_frozen_gate_verification_never_changes_a_mask(prompts):
    """Frozen: every patched run (edges or heads) and the corrupted run use exactly the clean run's gates;
    recomputed: the same patches open and close gates (so the check can fail)."""
    model = make_model("gated")
    changed = {}
    for gates in ("frozen", "recomputed"):
        prepared = prepare(model, gates=gates)
        prompt_set = PromptSet(prepared, batches_of(prompts))
        allowed = prepared.layout.allowed()
        generator = torch.Generator().manual_seed(0)
        changed[gates] = 0
        for batch, corrupted, masks in zip(prompt_set.batches, prompt_set.recordings, prompt_set.masks):
            with torch.no_grad():
                clean = prepared.module(input_ids=batch.clean, record_masks=True).gate_record.gate_masks
            assert masks is None if gates == "recomputed" else all(torch.equal(a, b) for a, b in zip(masks, clean))
            patches = [{"keep_edges": allowed & (torch.rand(allowed.shape, generator=generator) < share)}
                       for share in (0.0, 0.3, 0.7)]
            patches.append({"keep_heads": torch.rand(TINY.n_layers, TINY.n_heads, generator=generator) < 0.5})
            for keep in [*patches, None]:
                hooks = ComponentHooks(prepared.layout, corrupted=corrupted if keep else None, **(keep or {}))
                with hooks.attached(prepared.module), prepared.gates_of(masks), torch.no_grad():
                    ids = batch.clean if keep else batch.corrupted
                    used = prepared.module(input_ids=ids, record_masks=True).gate_record.gate_masks
                changed[gates] += sum(int((a != b).sum()) for a, b in zip(used, clean))
    assert changed["frozen"] == 0 and changed["recomputed"] > 0
    with pytest.raises(GateError, match="one mask per layer"), model.frozen_gates(clean[:1]):
        pass
    with pytest.raises(GateError, match="'eval' mode"), make_model("dense").frozen_gates(clean):
        pass


def test_pruning_removes_exactly_the_dead_edges_of_a_hand_built_graph():
    layout = ComponentLayout(n_layers=2, n_heads=2, split_qkv=True)
    h = layout.head_row

    def q(layer: int, head: int, kind: int) -> int:  # column of a head's q (0), k (1) or v (2) input
        return layout.head_cols(layer).start + head * 3 + kind

    kept = torch.zeros(layout.n_rows, layout.n_cols, dtype=torch.bool)
    path = [(0, q(0, 0, 0)), (h(0, 0), q(1, 1, 2)), (h(1, 1), layout.logits_col)]  # embed -> L0H0 -> L1H1 -> logits
    dead = [(0, q(0, 1, 1)),  # into L0H1, which reaches nothing
            (layout.mlp_row(0), layout.logits_col),  # from L0's MLP, which nothing feeds
            (h(0, 0), layout.mlp_col(1))]  # into L1's MLP, which reaches nothing
    for edge in path + dead:
        kept[edge] = True
    expected = torch.zeros_like(kept)
    for edge in path:
        expected[edge] = True
    assert torch.equal(live_edges(kept, layout), expected)
    assert torch.equal(live_edges(expected, layout), expected)
    # by position (P = 2, the logits read position 1): a k input at 0 reaches its head's output at 1, a q input
    # at 0 only its output at 0; logits edges at position 0 are read by nothing
    kept = torch.zeros(layout.n_rows, layout.n_cols, 2, dtype=torch.bool)
    live = [(0, q(0, 0, 1), 0), (h(0, 0), layout.logits_col, 1)]
    dead = [(0, q(0, 1, 0), 0), (h(0, 1), layout.logits_col, 1), (h(0, 0), layout.logits_col, 0)]
    for edge in live + dead:
        kept[edge] = True
    pruned = live_edges(kept, layout)
    assert sorted(map(tuple, pruned.nonzero().tolist())) == sorted(live)


@pytest.mark.parametrize("kind,gates", [("hf", "recomputed"), ("gated", "recomputed"), ("gated", "frozen")])
def test_pruned_edges_do_not_change_the_patched_metric(kind, gates, prompts):
    prepared = prepare(make_model(kind), gates=gates)
    layout = prepared.layout
    prompt_set = PromptSet(prepared, batches_of(mixed_length_prompts(prompts)))
    generator = torch.Generator().manual_seed(1)
    n_pruned = 0
    for shape in ((layout.n_rows, layout.n_cols), (layout.n_rows, layout.n_cols, len(prompt_set.roles))):
        allowed = layout.allowed() if len(shape) == 2 else layout.allowed()[:, :, None].expand(shape)
        for share in (0.05, 0.2):
            keep = allowed & (torch.rand(shape, generator=generator) < share)
            if len(shape) == 2:
                live = live_edges(keep, layout)
            else:  # brute force: each prompt's live token edges, pooled by role
                live = live_role_edges(keep, layout, prompt_set.role_sequences())
                expected = torch.zeros_like(live)
                for roles in prompt_set.role_sequences():
                    for position, alive in enumerate(live_edges(keep[:, :, roles], layout).unbind(2)):
                        expected[:, :, roles[position]] |= alive
                assert torch.equal(live, expected)
            n_pruned += int((keep & ~live).sum())
            assert prompt_set.mean_metric(keep_edges=live) == pytest.approx(prompt_set.mean_metric(keep_edges=keep),
                                                                            abs=1e-5)
    assert n_pruned > 0


def test_spearman_and_ranking_faithfulness(prompts):
    assert spearman(np.array([1, 2, 3, 4.0]), np.array([10, 20, 25, 100.0])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 2, 3.0]), np.array([3, 2, 2, 1.0])) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.array([1.0, 1.0]), np.array([1.0, 2.0])))
    config = ComponentCircuitConfig(curve_points=3, refine=False, role_edges=False, faithfulness_edges=8)
    result = run(config, make_model("hf", linear_after_last_heads), byte_tokenizer(), prompts)
    assert result.faithfulness["n_edges"] == 8 and result.faithfulness["n_heads"] == 8
    assert -1 <= result.faithfulness["edges_vs_exact"] <= 1 and -1 <= result.faithfulness["heads_eap_vs_exact"] <= 1


def test_command_line_reuses_an_earlier_dense_trace_and_refuses_a_mismatched_one(tmp_path, capsys):
    """`--reuse-dense` takes the dense circuits of an earlier dense-only run: the comparison equals one run that
    traces both; another circuit config, other prompts or another dense model is one error line, exit 2."""
    import json

    from circuits.__main__ import main

    model, tokenizer = tiny_model(TinyModelConfig())
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.2, 0.2, gated.offsets.numel()).view_as(gated.offsets))
    gated.save(tmp_path / "sparse", tokenizer)
    common = ["--tasks", "greater_than", "--dense", "tiny", "--points", "3", "--dense-points", "2",
              "--faithfulness-edges", "2", "--bootstrap", "50", "--no-role-edges", "--headline-only"]
    main([*common, "--n", "3", "--out", str(tmp_path / "dense.json")])
    main([*common, "--n", "3", "--sparse", str(tmp_path / "sparse"), "--out", str(tmp_path / "both.json")])
    main([*common, "--n", "3", "--sparse", str(tmp_path / "sparse"), "--reuse-dense", str(tmp_path / "dense.json"),
          "--out", str(tmp_path / "reused.json")])
    both = json.loads((tmp_path / "both.json").read_text())["tasks"]["greater_than"]["frozen"]
    reused = json.loads((tmp_path / "reused.json").read_text())
    assert reused["dense_reused_from"] == str(tmp_path / "dense.json")
    assert reused["command"].startswith("python -m circuits --tasks greater_than") and "--reuse-dense" in reused["command"]
    assert reused["tasks"]["greater_than"]["frozen"]["dense"]["cpu_seconds"] == json.loads(
        (tmp_path / "dense.json").read_text())["tasks"]["greater_than"]["frozen"]["dense"]["cpu_seconds"]
    for key in ("dense", "sparse", "comparison"):
        a, b = both[key], reused["tasks"]["greater_than"]["frozen"][key]
        if key != "comparison":
            a, b = ({k: v for k, v in r.items() if k != "cpu_seconds"} for r in (a, b))
        assert a == b
    capsys.readouterr()
    for changed, message in ((["--n", "2"], "other greater_than prompts"),
                             (["--n", "3", "--ig-steps", "3"], "ig_steps 5 there, 3 here"),
                             (["--n", "3", "--per-prompt"], "no per-prompt dense circuit"),
                             (["--n", "3", "--precision", "bf16"], "precision 'fp32' there, 'bf16' here")):
        with pytest.raises(SystemExit) as exit_info:
            main([*common, *changed, "--sparse", str(tmp_path / "sparse"), "--reuse-dense",
                  str(tmp_path / "dense.json"), "--out", str(tmp_path / "refused.json")])
        assert exit_info.value.code == 2
        error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(error_lines) == 1 and message in error_lines[0], error_lines
    assert not (tmp_path / "refused.json").exists()
