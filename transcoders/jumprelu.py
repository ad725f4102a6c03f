"""JumpReLU: sae-lens' autograd function for training, a plain forward for everything else.

Forward: `act = pre * (pre > threshold)` (strictly greater, like circuit-tracer and sae-lens). Training
uses sae-lens' `JumpReLU` (Rajamanoharan et al. 2024) with its threshold handling: the threshold is a
parameter in its own units (no log), and the backward uses pseudo-derivatives

- d act / d pre       = 1[pre > threshold]          (`ste_to_input=False`: no estimator through the jump)
- d act / d threshold = -(threshold / bandwidth) * K((pre - threshold) / bandwidth),  K(u) = 1[|u| < 1/2]

summed over the batch. sae-lens imports transformer-lens (seconds), so it is imported on the first call
that needs a gradient, never when this module is imported.
"""

from __future__ import annotations

import torch


def jumprelu_forward(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The JumpReLU's value: `pre` where it is strictly above `threshold` (broadcast), else 0."""
    return torch.where(pre > threshold, pre, 0.0)


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU of `pre` [..., *threshold.shape] with a per-feature `threshold` (e.g. [F] or [L, F]); with
    gradients (sae-lens' straight-through estimator) when autograd needs them, else `jumprelu_forward`."""
    if bandwidth <= 0:
        raise ValueError(f"JumpReLU bandwidth must be positive, got {bandwidth}")
    if not (torch.is_grad_enabled() and (pre.requires_grad or threshold.requires_grad)):
        return jumprelu_forward(pre, threshold)
    feature_dims = pre.shape[pre.dim() - threshold.dim():]
    if threshold.dim() > pre.dim() or feature_dims != threshold.shape:
        raise ValueError(f"JumpReLU threshold of shape {tuple(threshold.shape)} does not match the trailing "
                         f"dimensions of pre-activations {tuple(pre.shape)}")
    from sae_lens.saes.jumprelu_sae import JumpReLU  # slow import: only where training needs it

    flat = pre.reshape(-1, *threshold.shape)  # sae-lens sums the threshold gradient over dim 0
    return JumpReLU.apply(flat, threshold.to(pre.dtype), bandwidth, False).view(pre.shape)
