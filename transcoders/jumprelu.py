"""JumpReLU with a rectangle-kernel straight-through estimator for its threshold (Rajamanoharan et al. 2024).

Forward: `act = pre * (pre > threshold)` (strictly greater, like circuit-tracer). The step has no
useful derivative, so the backward uses pseudo-derivatives:

- d act / d pre       = 1[pre > threshold]                                  (no estimator through the jump)
- d act / d threshold = -(threshold / bandwidth) * K((pre - threshold) / bandwidth),  K(u) = 1[|u| < 1/2]

The threshold is stored directly (not as a log), so its gradient is the formula above as is.
"""

from __future__ import annotations

import torch


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 on the open interval (-1/2, 1/2), else 0, in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def jumprelu_forward(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The JumpReLU's value: `pre` where it is strictly above `threshold` (broadcast), else 0."""
    return torch.where(pre > threshold, pre, 0.0)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return jumprelu_forward(pre, threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_pre = torch.where(pre > threshold, grad, 0.0)
        if ctx.needs_input_grad[1]:
            in_window = (pre - threshold).abs_() < ctx.bandwidth / 2  # rectangle((pre - threshold) / bandwidth)
            summed = torch.where(in_window, grad, 0.0).sum_to_size(threshold.shape)
            grad_threshold = -(threshold / ctx.bandwidth) * summed  # the factor is per feature: apply it once
        return grad_pre, grad_threshold, None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU of `pre` [..., F] with per-feature `threshold` broadcastable to it (e.g. [F] or [L, F])."""
    if bandwidth <= 0:
        raise ValueError(f"JumpReLU bandwidth must be positive, got {bandwidth}")
    return _JumpReLU.apply(pre, threshold, bandwidth)
