"""Exact checks of the gate math, the gated attention function and the Lagrange controller."""

import math

import pytest
import torch

from sparse_attention.constraint import ControllerConfig, LagrangeController
from sparse_attention.gate import (
    count_open_edges,
    expected_open_fraction,
    logistic_noise,
    masked_softmax,
    straight_through_gate,
)
from sparse_attention.gated_attention import (
    _ACTIVE_GATE,
    GateError,
    GateRecord,
    _GateContext,
    gated_attention_forward,
)


def causal(q: int, k: int) -> torch.Tensor:
    return torch.ones(q, k, dtype=torch.bool).tril()[None, None]


class FakeAttention(torch.nn.Module):
    layer_idx = 0


def run_attention(q, k, v, offsets, mode="eval", mask=None):
    ctx = _GateContext([offsets], mode, False, None, True, GateRecord())
    token = _ACTIVE_GATE.set(ctx)
    try:
        out, weights = gated_attention_forward(FakeAttention(), q, k, v, mask, scaling=1.0)
    finally:
        _ACTIVE_GATE.reset(token)
    return out, weights, ctx.record


def test_output_is_masked_softmax_not_renormalised():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3)
    offsets = torch.tensor([0.3, -0.2])
    out, weights, record = run_attention(q, k, v, offsets)
    scores = q @ k.transpose(2, 3)
    probs = torch.softmax(scores.masked_fill(~causal(5, 5), float("-inf")), -1)
    gate = ((scores + offsets.view(1, 2, 1, 1)) > 0) & causal(5, 5)
    expected = (probs * gate) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=0, atol=1e-6)
    assert 0 < gate.sum() < causal(5, 5).sum() * 2  # some closed, some open: the case is informative
    renormalised = (probs * gate) / (probs * gate).sum(-1, keepdim=True).clamp(min=1e-9)
    assert not torch.allclose(weights, renormalised, atol=1e-3)
    assert torch.equal(record.gate_masks[0], gate)


def test_grouped_query_heads_share_keys():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    out, _, _ = run_attention(q, k, v, torch.full((4,), 1e4))
    k_full, v_full = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    probs = torch.softmax((q @ k_full.transpose(2, 3)).masked_fill(~causal(6, 6), float("-inf")), -1)
    torch.testing.assert_close(out, (probs @ v_full).transpose(1, 2), rtol=0, atol=1e-6)


def test_gate_outside_gated_model_is_an_error():
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(GateError, match="outside GatedModel"):
        gated_attention_forward(FakeAttention(), x, x, x, None, scaling=1.0)


def test_masked_softmax_rows_without_keys_are_zero():
    allowed = torch.tensor([[False, False], [True, True]])[None, None]
    probs = masked_softmax(torch.zeros(1, 1, 2, 2), allowed)
    assert torch.equal(probs[0, 0], torch.tensor([[0.0, 0.0], [0.5, 0.5]]))


def test_straight_through_gradient_matches_finite_differences_of_relaxed_gate():
    torch.manual_seed(2)
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 4, dtype=torch.float64)
    weights = torch.randn(3, 4, dtype=torch.float64)
    gate = straight_through_gate(logits, noise)
    assert torch.equal(gate.detach(), (logits + noise > 0).double())  # forward: hard sample
    (gate * weights).sum().backward()
    eps = 1e-6
    numeric = torch.zeros_like(logits)
    for idx in range(logits.numel()):
        bump = torch.zeros(logits.numel(), dtype=torch.float64)
        bump[idx] = eps
        bump = bump.view_as(logits)
        up = (torch.sigmoid(logits.detach() + bump + noise) * weights).sum()
        down = (torch.sigmoid(logits.detach() - bump + noise) * weights).sum()
        numeric.view(-1)[idx] = (up - down) / (2 * eps)
    torch.testing.assert_close(logits.grad, numeric, rtol=1e-6, atol=1e-9)


def test_bf16_logistic_noise_is_the_fp32_noise_rounded_and_unbiased():
    """bf16 training gates draw the same noise as fp32 ones, rounded to bf16 (drawn in fp32, not in bf16 where
    the upper tail stopped at +5.5 and the mean was -0.042 on 5.9M samples)."""
    shape = torch.Size([4, 9, 64, 64])
    fp32 = logistic_noise(shape, like=torch.zeros(1), generator=torch.Generator().manual_seed(3))
    bf16 = logistic_noise(shape, like=torch.zeros(1, dtype=torch.bfloat16), generator=torch.Generator().manual_seed(3))
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert torch.equal(bf16, fp32.to(torch.bfloat16))
    noise = bf16.float()  # 147,456 samples: the logistic mean 0 (sd of the mean 0.005), both tails past +-9
    assert abs(noise.mean().item()) < 0.02 and noise.max().item() > 9 and noise.min().item() < -9
    for logit in (-4.0, 0.0):  # P(logit + noise > 0) = sigmoid(logit), within 4 standard errors
        p = math.exp(logit) / (1 + math.exp(logit))
        assert abs(((logit + noise) > 0).float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / noise.numel())


def test_regulariser_is_mean_sigmoid_over_causal_pairs_hand_computed():
    logits = torch.tensor([[[[0.0, 9.0], [math.log(3.0), -math.log(3.0)]]]])  # [1, 1, 2, 2]
    # causal pairs: (0,0) sigmoid 0.5; (1,0) 0.75; (1,1) 0.25; the (0,1) logit 9 is not causal
    value = expected_open_fraction(logits, causal(2, 2))
    torch.testing.assert_close(value, torch.tensor([0.5]), rtol=0, atol=1e-7)


def test_edge_counting_on_known_mask():
    gate = torch.tensor([[[[1.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]],
                         [[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]]])  # [2, 1, 3, 3]
    open_edges, pairs = count_open_edges(gate, causal(3, 3))
    assert open_edges.tolist() == [1 + 1 + 2 + 0 + 1 + 3]  # (0,1) is not causal and not counted
    assert pairs.tolist() == [12]


def test_multiplier_rises_above_target_and_falls_below():
    ctrl = LagrangeController(ControllerConfig(tolerance=0.01, lambda_init=1.0, ema=0.5, rate=0.05))
    seen = [ctrl.update(0.1) for _ in range(5)]
    assert all(b > a for a, b in zip([1.0] + seen, seen))
    high = ctrl.multiplier
    for _ in range(40):
        ctrl.update(-0.1)
    assert ctrl.multiplier < high and ctrl.multiplier < 1.0
    for _ in range(10_000):
        ctrl.update(-10.0)
    assert ctrl.multiplier == pytest.approx(ctrl.config.lambda_min)


def test_pi_controller_steps_exactly():
    # ema 0 and scale 1: the error is the violation itself; log-lambda moves by kp * (e_t - e_{t-1}) + ki * e_t
    cfg = ControllerConfig(tolerance=0.5, lambda_init=1.0, lambda_min=math.exp(-2), lambda_max=math.exp(2), ema=0.0,
                           scale=1.0, rate=0.1, proportional=1.0, max_log_step=0.2)
    ctrl = LagrangeController(cfg)
    ctrl.update(0.5 + 1.0)  # e = 1: +1 (proportional, from e_0 = 0) +0.1 (integral)
    assert math.log(ctrl.multiplier) == pytest.approx(1.1)
    ctrl.update(0.5 + 1.0)  # e unchanged: integral only
    assert math.log(ctrl.multiplier) == pytest.approx(1.2)
    ctrl.update(0.5)  # e = 0: the proportional part is taken back
    assert math.log(ctrl.multiplier) == pytest.approx(0.2)
    ctrl.update(0.5 + 5.0)  # e = 5: +5 +0.2 (integral step bounded), clipped at log lambda_max = 2
    assert math.log(ctrl.multiplier) == pytest.approx(2.0)


def test_pi_controller_does_not_wind_up_at_its_floor():
    cfg = ControllerConfig(tolerance=0.5, lambda_init=1.0, lambda_min=math.exp(-2), lambda_max=math.exp(2), ema=0.0,
                           scale=1.0, rate=0.1, proportional=1.0, max_log_step=0.2)
    ctrl = LagrangeController(cfg)
    for _ in range(500):
        ctrl.update(0.5 - 1.0)  # long below target: lambda sits at its floor
    assert math.log(ctrl.multiplier) == pytest.approx(-2.0)
    ctrl.update(0.5 + 1.0)  # e: -1 -> 1, so +2 (proportional) +0.1 (integral) from the floor at once
    assert math.log(ctrl.multiplier) == pytest.approx(0.1)
    state = ctrl.state_dict()
    again = LagrangeController(cfg)
    again.load_state_dict(state)
    assert again.update(0.7) == ctrl.update(0.7)


def test_normalised_lagrangian():
    ctrl = LagrangeController(ControllerConfig(lambda_init=3.0))
    value = ctrl.loss(torch.tensor(0.2), torch.tensor(0.5))
    assert value.item() == pytest.approx((0.2 + 3.0 * 0.5) / 4.0)


def test_controller_config_errors_name_the_field():
    with pytest.raises(ValueError, match="lambda_min <= lambda_init"):
        ControllerConfig(lambda_init=1e-6)
    with pytest.raises(ValueError, match="tolerance"):
        ControllerConfig(tolerance=-1)
