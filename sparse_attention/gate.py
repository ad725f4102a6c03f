"""The attention gate of sparse post-training, as pure tensor functions.

For head h, query i, key j: gate logit g_ij = s_ij + b (s = q.k / sqrt(d_head), b = offset).
Training samples a hard gate 1[g + logistic noise > 0] with a straight-through gradient through
sigmoid(g + noise); evaluation uses 1[g > 0]. The attention output is softmax(s) over all causal
keys, multiplied by the gate, NOT renormalised: a query whose gates are all shut writes nothing.
"""

from __future__ import annotations

import torch


def gate_logits(scores: torch.Tensor, offset: torch.Tensor | float) -> torch.Tensor:
    """Gate logits s + b.  scores [batch, head, q, k]; offset scalar or [head] (broadcast per head)."""
    if isinstance(offset, torch.Tensor) and offset.ndim == 1:
        offset = offset.view(1, -1, 1, 1)
    return scores + offset


def logistic_noise(shape: torch.Size, *, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of the standard logistic distribution, log(u) - log(1 - u), in `like`'s dtype. Drawn and computed in
    float32 whatever that dtype: torch.rand in bfloat16 wraps the 0.2% of u that round to 1 to 0 and keeps 8 bits,
    so the noise lost its upper tail above +5.5, those draws became -13.8 (mean -0.042), and P(open | logit -4)
    was 0.0156 instead of sigmoid(-4) = 0.0180."""
    u = torch.rand(shape, dtype=torch.float32, device=like.device, generator=generator)
    u = u.clamp(1e-6, 1 - 1e-6)
    return (torch.log(u) - torch.log1p(-u)).to(like.dtype)


def straight_through_gate(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Hard Bernoulli(sigmoid(logits)) sample whose gradient is that of sigmoid(logits + noise)."""
    relaxed = torch.sigmoid(logits + noise)
    hard = (logits + noise > 0).to(logits.dtype)
    return hard + (relaxed - relaxed.detach())  # exactly the hard value forward


def hard_gate(logits: torch.Tensor) -> torch.Tensor:
    """Deterministic evaluation gate 1[logit > 0], as a float mask."""
    return (logits > 0).to(logits.dtype)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over allowed keys only.  scores [b, h, q, k]; allowed bool, broadcastable."""
    masked = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(masked.float(), dim=-1).to(scores.dtype)
    return probs * allowed  # rows with no allowed key (e.g. padding) become zero, not uniform


def expected_open_fraction(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean of sigmoid(gate logit) over allowed (causal, unpadded) pairs, per head.

    logits [b, h, q, k]; allowed bool [b, 1|h, q, k]  ->  [h].  This is the sparsity regulariser.
    """
    allowed = allowed.expand_as(logits)
    open_prob = torch.sigmoid(logits) * allowed
    return open_prob.sum(dim=(0, 2, 3)) / allowed.sum(dim=(0, 2, 3)).clamp(min=1)


def count_open_edges(gate: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(open gates, allowed pairs) per head, for edge fractions.  gate [b, h, q, k] -> ([h], [h])."""
    allowed = allowed.expand_as(gate)
    open_edges = ((gate > 0) & allowed).sum(dim=(0, 2, 3))
    return open_edges, allowed.sum(dim=(0, 2, 3))
