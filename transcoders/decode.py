"""CLT decoding: feature activations -> reconstructed MLP outputs of every layer, sparse and dense.

Source layer s writes, through W_dec[s] [F, L - s, D], into the MLP outputs of layers s..L-1, so
`out[:, t] = sum_{s <= t} acts[:, s] @ W_dec[s][:, t - s]`. Laid out as one row of L * D numbers per
token, source s touches the columns s * D onwards, and `W_dec[s].reshape(F, (L - s) * D)` is exactly the
matrix to multiply by: one matmul per source layer.

`sparse_decode` multiplies only by the active features (a COO sparse matrix per source layer), so its
cost grows with L0, not with F. Its gradient with respect to `acts` is defined on the active entries
only (zero elsewhere): that is the point of decoding sparsely, and it means the JumpReLU threshold
gets its reconstruction gradient from active positions only. `decode_dense` is the plain reference.
"""

from __future__ import annotations

import warnings

import torch

# torch warns once per process that sparse CSR support is "beta"; the kernels used here are stable.
_SPARSE_CSR_WARNING = "Sparse CSR tensor support is in beta state"


def decode_dense(acts: torch.Tensor, W_dec: list[torch.Tensor]) -> torch.Tensor:
    """Reference decode, no bias: acts [N, L, F], W_dec[s] [F, L - s, D] -> [N, L, D]."""
    n_tokens, n_layers, n_features = acts.shape
    d_model = W_dec[0].shape[-1]
    out = acts.new_zeros(n_tokens, n_layers * d_model)  # [N, L * D]
    for source, weight in enumerate(W_dec):
        out[:, source * d_model:] += acts[:, source] @ weight.reshape(n_features, -1)
    return out.view(n_tokens, n_layers, d_model)


def _active_entries(acts: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per source layer: token ids, feature ids and values of the non-zero activations, sorted by (token, feature)."""
    layer_major = acts.transpose(0, 1)  # [L, N, F]
    layer, token, feature = layer_major.nonzero(as_tuple=True)  # sorted by (layer, token, feature)
    values = layer_major[layer, token, feature]
    counts = torch.bincount(layer, minlength=acts.shape[1]).tolist()
    return list(token.split(counts)), list(feature.split(counts)), list(values.split(counts))


def _coo(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A coalesced COO matrix; (rows, cols) must already be sorted row-major and unique."""
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, shape, is_coalesced=True, check_invariants=False
    )


def _csr_pattern(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix with the same row-major-sorted entries (for sampled_addmm, which wants CSR)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SPARSE_CSR_WARNING)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """out = decode_dense(acts, W_dec) computed from the non-zero entries of acts only."""

    @staticmethod
    def forward(ctx, acts: torch.Tensor, *W_dec: torch.Tensor) -> torch.Tensor:
        n_tokens, n_layers, n_features = acts.shape
        d_model = W_dec[0].shape[-1]
        tokens, features, values = _active_entries(acts)
        out = acts.new_zeros(n_tokens, n_layers * d_model)  # [N, L * D]
        for source, weight in enumerate(W_dec):
            if len(values[source]):
                active = _coo(tokens[source], features[source], values[source], (n_tokens, n_features))
                out[:, source * d_model:] += torch.sparse.mm(active, weight.reshape(n_features, -1))
        ctx.save_for_backward(*W_dec)
        ctx.entries = (tokens, features, values)
        ctx.shape = acts.shape
        return out.view(n_tokens, n_layers, d_model)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        W_dec = ctx.saved_tensors
        tokens, features, values = ctx.entries
        n_tokens, n_layers, n_features = ctx.shape
        d_model = W_dec[0].shape[-1]
        grad_rows = grad_out.reshape(n_tokens, n_layers * d_model)  # [N, L * D]
        want_acts, want_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1:]
        grad_acts = grad_out.new_zeros(n_layers, n_tokens, n_features) if want_acts else None  # [L, N, F]
        grad_weights: list[torch.Tensor | None] = []
        for source, weight in enumerate(W_dec):
            grad_source = grad_rows[:, source * d_model:]  # [N, (L - s) * D]
            flat = weight.reshape(n_features, -1)  # [F, (L - s) * D]
            token, feature, value = tokens[source], features[source], values[source]
            if want_weights[source]:
                by_feature = torch.argsort(feature * n_tokens + token)
                transposed = _coo(feature[by_feature], token[by_feature], value[by_feature], (n_features, n_tokens))
                grad_weights.append(torch.sparse.mm(transposed, grad_source).view_as(weight))
            else:
                grad_weights.append(None)
            if want_acts and len(value):
                pattern = _csr_pattern(token, feature, value, (n_tokens, n_features))
                dots = torch.sparse.sampled_addmm(pattern, grad_source, flat.t(), beta=0.0).values()
                grad_acts[source, token, feature] = dots
        grad_acts = grad_acts.transpose(0, 1) if want_acts else None
        return (grad_acts, *grad_weights)


def sparse_decode(acts: torch.Tensor, W_dec: list[torch.Tensor]) -> torch.Tensor:
    """Decode from active features only, no bias: acts [N, L, F], W_dec[s] [F, L - s, D] -> [N, L, D].

    Equals `decode_dense` (outputs, and gradients on the active entries and on W_dec) up to float
    rounding; cost is O(active entries * L * D) instead of O(N * F * L * D).
    """
    if acts.layout != torch.strided:
        raise ValueError(f"sparse_decode takes a dense [N, L, F] tensor of activations, got layout {acts.layout}")
    return _SparseDecode.apply(acts, *W_dec)
