"""The bf16 training decode (transcoders/decode.py): the dense bf16 Function against the sparse fp32 one
within a stated rounding bound, its gradient semantics, and which one `decode_with_norms` picks."""

from __future__ import annotations

import pytest
import torch

from transcoders import decode
from transcoders.decode import _DenseBf16Decode, _SparseDecode, decode_dense, decode_with_norms

torch.set_num_threads(1)

# Each bf16 matmul rounds both operands (2^-9 relative each) and its product (2^-9) and accumulates in fp32;
# source layers are summed in fp32. So each entry is off by at most 3 * 2^-9 of the sum of |terms| that
# make it (the matching product of absolute values); the bound below allows 4 * 2^-9 for fp32 rounding.
BF16_BOUND = 4 * 2.0**-9


def random_decode_inputs(n_tokens=24, n_layers=3, n_features=20, d_model=8, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    by_layer = torch.randn(n_layers, n_tokens, n_features, generator=g).abs()  # layer-major, as the CLT's
    acts = (by_layer * (torch.rand(n_layers, n_tokens, n_features, generator=g) < density)).transpose(0, 1)
    W_dec = [torch.randn(n_features, n_layers - s, d_model, generator=g) for s in range(n_layers)]
    return acts, W_dec


def run(function, acts, W_dec, grad_out, grad_norms):
    """Outputs and gradients of one decode Function: (out, norms, d acts, [d W_dec[s]])."""
    acts = acts.clone().requires_grad_(True)
    weights = [w.clone().requires_grad_(True) for w in W_dec]
    out, norms = function.apply(acts, True, *weights)
    ((out * grad_out).sum() + (norms * grad_norms).sum()).backward()
    return out.detach(), norms.detach(), acts.grad, [w.grad for w in weights]


def test_dense_bf16_decode_equals_sparse_fp32_decode_within_bf16_rounding():
    acts, W_dec = random_decode_inputs()
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(acts.shape[0], acts.shape[1], W_dec[0].shape[-1], generator=g)  # [N, L, D]
    grad_norms = torch.randn(acts.shape[1], acts.shape[2], generator=g)  # [L, F]
    out_s, norms_s, ga_s, gw_s = run(_SparseDecode, acts, W_dec, grad_out, grad_norms)
    out_b, norms_b, ga_b, gw_b = run(_DenseBf16Decode, acts, W_dec, grad_out, grad_norms)
    assert out_b.dtype == ga_b.dtype == gw_b[0].dtype == torch.float32  # fp32 in and out; bf16 inside only
    assert torch.equal(norms_b, norms_s)  # the decoder norms stay fp32
    magnitude = decode_dense(acts.abs(), [w.abs() for w in W_dec])  # [N, L, D] sum of |terms|
    assert (out_b - out_s).abs().max() > 0  # bf16 did round: the bound is what is tested
    assert torch.all((out_b - out_s).abs() <= BF16_BOUND * magnitude + 1e-6)
    active = acts != 0
    assert torch.all(ga_b[~active] == 0) and torch.all(ga_s[~active] == 0)  # gradients on active entries only
    n_tokens, n_layers, n_features = acts.shape
    rows = grad_out.reshape(n_tokens, -1).abs()  # [N, L * D]
    d_model = W_dec[0].shape[-1]
    for source, weight in enumerate(W_dec):
        flat = weight.reshape(n_features, -1).abs()  # [F, (L - s) * D]
        acts_bound = rows[:, source * d_model:] @ flat.t()  # [N, F]
        assert torch.all((ga_b[:, source] - ga_s[:, source]).abs() <= BF16_BOUND * acts_bound + 1e-6)
        weight_bound = (acts[:, source].abs().t() @ rows[:, source * d_model:]).view_as(weight)
        assert torch.all((gw_b[source] - gw_s[source]).abs() <= BF16_BOUND * weight_bound + 1e-6)


def test_dense_bf16_decode_without_a_norm_gradient_gives_the_reconstruction_gradient_alone():
    acts, W_dec = random_decode_inputs(seed=3)
    weights = [w.clone().requires_grad_(True) for w in W_dec]
    out, _ = _DenseBf16Decode.apply(acts, True, *weights)
    out.sum().backward()  # the norms take no part in this loss
    n_tokens, n_layers, _ = acts.shape
    d_model = W_dec[0].shape[-1]
    grad_rows = torch.ones(n_tokens, n_layers * d_model)  # [N, L * D]
    for source, weight in enumerate(weights):
        product = acts[:, source].t() @ grad_rows[:, source * d_model:]  # [F, (L - s) * D]
        bound = BF16_BOUND * product.abs() + 1e-6
        assert torch.all((weight.grad.view_as(product) - product).abs() <= bound)


@pytest.mark.parametrize(("density", "autocast", "expected"), [
    (0.3, True, "_DenseBf16DecodeBackward"),
    (0.3, False, "_SparseDecodeBackward"),  # fp32: always the sparse fp32 decode
    (0.004, True, "_SparseDecodeBackward"),  # below DENSE_BF16_MIN_DENSITY the sparse decode is cheaper
])
def test_decode_with_norms_picks_dense_bf16_only_under_bf16_autocast_above_the_density(density, autocast, expected):
    acts, W_dec = random_decode_inputs(n_tokens=64, n_features=40, density=density)
    fraction = (acts != 0).float().mean().item()
    assert (fraction >= decode.DENSE_BF16_MIN_DENSITY) == (density > 0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, norms = decode_with_norms(acts.requires_grad_(True), [w.requires_grad_(True) for w in W_dec])
    assert type(out.grad_fn).__name__ == expected
    assert out.dtype == norms.dtype == torch.float32
