"""Component circuits on tiny Llamas (plain HF, gated model in dense mode, gated with about half the gates
shut): exact patching identities, a hand-built one-head circuit, and EAP = patching where it is linear.
"""

from __future__ import annotations

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
    count_to_reach,
    head_scores,
    run,
    run_per_prompt,
)
from circuits.hooks import ComponentHooks, edge_attribution, patched_metric, prepare, record
from circuits.layout import ComponentLayout, top_k_mask
from prompts.batches import encode_prompts
from prompts.metrics import logit_diff, logits_fn
from prompts.tasks import generate_task
from sparse_attention.gated_attention import GatedModel
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


def make_model(kind: str, edit=None):
    """'hf': the HF model; 'dense': GatedModel with gates off; 'gated': hard gates, offsets -0.3..0.3.
    Weights are amplified, then `edit(hf_model)` changes them before wrapping."""
    model, _ = tiny_model(TINY)
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


@pytest.fixture(scope="module")
def prompts():
    """Six Greater-Than prompts of one byte length (so batches hold several prompts)."""
    candidates = generate_task("greater_than", byte_tokenizer(), 60, seed=0)
    lengths = [len(p.clean) for p in candidates]
    common = max(set(lengths), key=lengths.count)
    return [p for p in candidates if len(p.clean) == common][:6]


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
    assert [score for _, score in result.heads.top[1:]] == [0.0, 0.0]
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


@pytest.mark.parametrize("kind", ["hf", "gated"])
def test_position_edges_kept_at_every_position_are_component_edges(kind, prompts):
    """A per-position mask that repeats one [U, V] mask at every position patches exactly as that mask;
    dropping one reader's edges at a single position changes only what that position reads."""
    prepared = prepare(make_model(kind))
    layout = prepared.layout
    allowed = layout.allowed()
    keep = allowed & (torch.rand(allowed.shape, generator=torch.Generator().manual_seed(0)) < 0.5)
    for batch in batches_of(mixed_length_prompts(prompts)):
        corrupted, _ = record(prepared, batch.corrupted)
        n_pos = batch.clean.shape[1] + 3  # longer than this batch: its positions are the last ones
        by_position = keep[:, :, None].expand(-1, -1, n_pos)
        torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=by_position),
                                   patched_metric(prepared, batch, corrupted, keep_edges=keep), rtol=0, atol=1e-6)
        # the logits read only the last position: removing logits edges elsewhere changes nothing
        early = allowed[:, :, None].expand(-1, -1, n_pos).clone()
        early[:, layout.logits_col, :-1] = False
        full = patched_metric(prepared, batch, corrupted, keep_edges=allowed)
        torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=early), full,
                                   rtol=0, atol=1e-6)
        last = early.clone()
        last[:, layout.logits_col, -1] = False
        no_logits = allowed.clone()
        no_logits[:, layout.logits_col] = False
        torch.testing.assert_close(patched_metric(prepared, batch, corrupted, keep_edges=last),
                                   patched_metric(prepared, batch, corrupted, keep_edges=no_logits), rtol=0, atol=1e-6)
        with pytest.raises(CircuitError, match="positions"):
            patched_metric(prepared, batch, corrupted, keep_edges=by_position[:, :, :batch.clean.shape[1] - 1])


@pytest.mark.parametrize("kind", ["hf", "gated"])
def test_eap_by_position_sums_to_component_eap_and_matches_patching_where_linear(kind, prompts):
    prepared = prepare(make_model(kind, linear_after_last_heads))
    layout = prepared.layout
    prompt_set = PromptSet(prepared, batches_of(mixed_length_prompts(prompts)))
    assert len({b.clean.shape[1] for b in prompt_set.batches}) > 1
    by_position = prompt_set.edge_scores(by_position=True)  # [U, V, P]
    assert by_position.shape == (layout.n_rows, layout.n_cols, prompt_set.n_positions)
    torch.testing.assert_close(by_position.sum(-1), prompt_set.edge_scores(), rtol=1e-5, atol=1e-6)
    assert by_position[:, layout.logits_col, :-1].abs().max() == 0  # the metric reads the last position only
    assert by_position[:, layout.head_cols(1), :-1].abs().max() > 0  # heads read every position
    clean = prompt_set.mean_metric()
    allowed = layout.allowed()[:, :, None].expand(by_position.shape)
    effects = []
    for row in (0, layout.head_row(1, 2), layout.mlp_row(0)):  # the metric is linear in what the logits read
        keep = allowed.clone()
        keep[row, layout.logits_col, -1] = False
        effects.append(prompt_set.mean_metric(keep_edges=keep) - clean)
        assert by_position[row, layout.logits_col, -1].item() == pytest.approx(effects[-1], abs=2e-5)
    assert max(map(abs, effects)) > 1e-3


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


def test_count_to_reach_bisects_between_grid_points():
    calls = []

    def effect(k: int) -> float:
        calls.append(k)
        return min(1.0, k / 37)

    grid = count_grid(100, 6)
    assert grid[0] == 0 and grid[-1] == 100 and grid == sorted(set(grid))
    count, effects = count_to_reach(effect, grid, 0.9)
    assert count == 34 and effects[34] >= 0.9 > effects[33]
    count, _ = count_to_reach(effect, grid, 0.9, refine=False)
    assert count == min(k for k in grid if k >= 34)
    assert count_to_reach(lambda k: 0.5, grid, 0.9)[0] is None


def test_count_staying_above_reads_a_non_monotone_curve_robustly():
    effects = {0: 0.0, 1: 0.95, 2: 0.5, 4: 0.91, 8: 0.85, 16: 0.92, 32: 1.0}
    assert count_to_reach(effects.__getitem__, list(effects), 0.9, refine=False)[0] == 1
    assert count_staying_above(effects, 0.9) == 16
    assert count_staying_above({0: 0.0, 5: 0.8}, 0.9) is None


def test_top_k_mask_ranks_by_magnitude_within_allowed():
    scores = torch.tensor([[0.1, -3.0], [2.0, 5.0]])
    allowed = torch.tensor([[True, True], [True, False]])
    assert top_k_mask(scores, allowed, 2).tolist() == [[False, True], [True, False]]
    assert top_k_mask(scores, allowed, 3).sum() == 3 and not top_k_mask(scores, allowed, 4)[1, 1]


def test_run_gives_normalised_curves_and_a_comparison(prompts):
    config = ComponentCircuitConfig(curve_points=4, refine=False, precision="fp32")  # exact endpoints
    dense = run(config, make_model("dense"), byte_tokenizer(), prompts)
    sparse = run(config, make_model("gated"), byte_tokenizer(), prompts)
    for result in (dense, sparse):
        assert result.n_prompts == len(prompts)
        for curve in (result.heads, result.edges):
            effects = dict(zip(curve.counts, curve.effects))
            assert effects[0] == 0.0 and effects[curve.total] == pytest.approx(1.0, abs=1e-4)
        assert result.edges.metric_empty == pytest.approx(result.metric_corrupted, abs=1e-5)
        assert result.edges.total == int(ComponentLayout(2, 4, True).allowed().sum())
        n_positions = len(prompts[0].clean) + 1  # bos
        assert result.position_edges.total == result.edges.total * n_positions
        effects = dict(zip(result.position_edges.counts, result.position_edges.effects))
        assert effects[0] == 0.0 and effects[result.position_edges.total] == pytest.approx(1.0, abs=1e-4)
        assert " @-" in result.position_edges.top[0][0]
    comparison = compare(dense, sparse)
    assert comparison["heads"]["ratio"] == dense.heads.count_at_target / sparse.heads.count_at_target
    assert comparison["edges"]["sparse_stays_above"] == sparse.edges.count_stays_above
    assert comparison["position_edges"]["dense"] == dense.position_edges.count_at_target
    without = run(config.model_copy(update={"position_edges": False}), make_model("dense"), byte_tokenizer(), prompts)
    assert without.position_edges is None and "position_edges" not in compare(without, without)
    assert without.edges.counts == dense.edges.counts and without.edges.effects == pytest.approx(dense.edges.effects)
    assert set(result.to_json()) >= {"heads", "edges", "config", "metric_clean"}


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
          "--points", "3", "--out", str(out)])
    result = json.loads(out.read_text())["tasks"]["greater_than"]
    assert result["dense"]["n_prompts"] == result["sparse"]["n_prompts"] == 3
    assert set(result["comparison"]) == {"task", "target", "heads", "edges", "position_edges"}
    assert set(result["comparison"]["edges"]) >= {"ratio", "ratio_stays_above"}
    assert result["sparse"]["heads"]["metric_full"] != result["dense"]["heads"]["metric_full"]


def sized(count_heads: int | None, count_edges: int) -> CircuitResult:
    """A CircuitResult whose curves say only how many heads / edges reach the target."""
    def curve(count):
        return Curve(10, [0, 10], [0.0, 1.0], count, count, 1.0, 0.0, [])
    return CircuitResult("t", 1, 1.0, 0.0, curve(count_heads), curve(count_edges), {}, None)


def test_compare_per_prompt_pairs_prompts_and_bootstraps_the_ratio_of_means():
    dense = [sized(4, 40), sized(6, 60), "no effect", sized(None, 10)]
    sparse = [sized(2, 10), sized(2, 20), sized(1, 1), sized(3, 5)]
    summary = compare_per_prompt(dense, sparse, samples=500)
    assert summary["n_prompts"] == 4 and "position_edges" not in summary
    heads, edges = summary["heads"], summary["edges"]
    assert heads["n_pairs"] == 2 and heads["dense_counts"] == [4, 6] and heads["sparse_counts"] == [2, 2]
    assert heads["ratio"] == 5 / 2 and heads["ci_low"] <= 2.5 <= heads["ci_high"]
    assert edges["n_pairs"] == 3 and edges["ratio"] == pytest.approx((40 + 60 + 10) / (10 + 20 + 5))
    assert compare_per_prompt(dense, sparse, samples=500) == summary  # seeded
    with pytest.raises(CircuitError, match="pair by prompt"):
        compare_per_prompt(dense, sparse[:3])


def test_run_per_prompt_is_one_circuit_per_prompt(prompts):
    config = ComponentCircuitConfig(curve_points=3, refine=False, position_edges=False)
    model = make_model("gated")
    results = run_per_prompt(config, model, byte_tokenizer(), prompts[:2])
    assert [r.n_prompts for r in results] == [1, 1]
    alone = run(config, model, byte_tokenizer(), prompts[1:2])
    assert results[1].edges.counts == alone.edges.counts
    assert results[1].edges.effects == pytest.approx(alone.edges.effects)
