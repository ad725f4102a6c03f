"""CLT decoding: feature activations -> reconstructed MLP outputs of every layer, sparse and dense.

Source layer s writes, through W_dec[s] [F, L - s, D], into the MLP outputs of layers s..L-1, so
`out[:, t] = sum_{s <= t} acts[:, s] @ W_dec[s][:, t - s]`. Laid out as one row of L * D numbers per
token, source s touches the columns s * D onwards, and `W_dec[s].reshape(F, (L - s) * D)` is exactly the
matrix to multiply by: one matmul per source layer.

`sparse_decode` multiplies only by the active features (a COO sparse matrix per source layer), so its
cost grows with L0, not with F. Its gradient with respect to `acts` is defined on the active entries
only (zero elsewhere): that is the point of decoding sparsely, and it means the JumpReLU threshold
gets its reconstruction gradient from active positions only. `decode_dense` is the plain reference.

Training under bf16 autocast decodes with dense bfloat16 matmuls instead (`_DenseBf16Decode`, same map and
gradient semantics, fp32 master decoders and gradients) once enough activations are non-zero that this is
the cheaper kernel: `decode_with_norms` picks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

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


@dataclass
class _Entries:
    """The non-zero activations of one source layer, sorted by (token, feature)."""

    token: torch.Tensor  # [K] int64
    feature: torch.Tensor  # [K] int64
    value: torch.Tensor  # [K]
    position: torch.Tensor  # [K] index into the flattened layer-major [L, N, F] activations


def _active_entries(acts: torch.Tensor) -> list[_Entries]:
    """Per source layer, the non-zero entries of acts [N, L, F] (one nonzero over the whole tensor)."""
    n_tokens, n_layers, n_features = acts.shape
    flat = acts.transpose(0, 1).reshape(-1)  # [L * N * F], a view when acts is layer-major underneath
    position = flat.nonzero().squeeze(1)  # sorted by (layer, token, feature)
    value = flat[position]
    layer, within = position.div(n_tokens * n_features, rounding_mode="floor"), position % (n_tokens * n_features)
    token, feature = within.div(n_features, rounding_mode="floor"), within % n_features
    counts = torch.bincount(layer, minlength=n_layers).tolist()
    return [_Entries(*parts) for parts in zip(*(t.split(counts) for t in (token, feature, value, position)))]


def _coo(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A coalesced COO matrix; (rows, cols) must already be sorted row-major and unique."""
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, shape, is_coalesced=True, check_invariants=False
    )


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The same row-major-sorted entries as CSR (sampled_addmm wants CSR)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SPARSE_CSR_WARNING)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """(decode_dense(acts, W_dec), decoder norms [L, F]) computed from the non-zero entries of acts only.

    The norms come out of the same Function so that each decoder's gradient (from the reconstruction
    and from whatever uses the norms, e.g. the sparsity penalty) is built in one buffer, in place:
    at SmolLM2 sizes a decoder is gigabytes, and every extra full-size temporary costs a memory pass.
    """

    @staticmethod
    def forward(ctx, acts: torch.Tensor, with_norms: bool, *W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_tokens, n_layers, n_features = acts.shape
        d_model = W_dec[0].shape[-1]
        entries = _active_entries(acts)
        out = acts.new_zeros(n_tokens, n_layers * d_model)  # [N, L * D]
        for source, (weight, active) in enumerate(zip(W_dec, entries)):
            if len(active.value):
                matrix = _coo(active.token, active.feature, active.value, (n_tokens, n_features))
                out[:, source * d_model:].addmm_(matrix, weight.reshape(n_features, -1))  # in place
        norms = decoder_norms(W_dec) if with_norms else acts.new_zeros(n_layers, n_features)  # [L, F]
        ctx.save_for_backward(norms, *W_dec)
        ctx.entries, ctx.shape = entries, acts.shape
        ctx.set_materialize_grads(False)
        return out.view(n_tokens, n_layers, d_model), norms

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_norms: torch.Tensor | None):
        norms, *W_dec = ctx.saved_tensors
        n_tokens, n_layers, n_features = ctx.shape
        d_model = W_dec[0].shape[-1]
        want_acts = ctx.needs_input_grad[0] and grad_out is not None
        grad_rows = grad_out.reshape(n_tokens, n_layers * d_model) if grad_out is not None else None  # [N, L*D]
        grad_acts = grad_rows.new_zeros(n_layers * n_tokens * n_features) if want_acts else None  # layer-major
        grad_weights: list[torch.Tensor | None] = []
        for source, (weight, active) in enumerate(zip(W_dec, ctx.entries)):
            flat = weight.reshape(n_features, -1)  # [F, (L - s) * D]
            grad_source = grad_rows[:, source * d_model:] if grad_rows is not None else None  # [N, (L - s) * D]
            use_rows = grad_source is not None and len(active.value) > 0
            if use_rows:  # the entries by (feature, token): rows of the transposed activation matrix
                by_feature = torch.sort(active.feature, stable=True).indices
                feature, token = active.feature[by_feature], active.token[by_feature]
                value = active.value[by_feature]
            if ctx.needs_input_grad[2 + source]:
                if grad_norms is not None:  # d|w_f| / dw_f = w_f / |w_f|
                    grad = flat * (grad_norms[source] / norms[source].clamp_min(1e-30))[:, None]
                else:
                    grad = torch.zeros_like(flat)
                if use_rows:  # += acts^T @ grad_out, in place: no second decoder-sized temporary
                    grad.addmm_(_coo(feature, token, value, (n_features, n_tokens)), grad_source)
                grad_weights.append(grad.view_as(weight))
            else:
                grad_weights.append(None)
            if want_acts and use_rows:  # d out / d a[n, f] = <grad_out[n], w_f>, only where a[n, f] != 0
                pattern = _csr(feature, token, value, (n_features, n_tokens))
                dots = torch.sparse.sampled_addmm(pattern, flat, grad_source.t(), beta=0.0).values()
                grad_acts[active.position[by_feature]] = dots
        if want_acts:
            grad_acts = grad_acts.view(n_layers, n_tokens, n_features).transpose(0, 1)
        return (grad_acts, None, *grad_weights)


class _DenseBf16Decode(torch.autograd.Function):
    """`_SparseDecode`'s map and gradients, computed with dense bfloat16 matmuls: each matmul accumulates in
    fp32 and rounds its product to bf16, the source layers are summed in fp32. The decoders stay fp32 masters
    (their bf16 copies are made once per call) and get fp32 gradients; `acts` gets its gradient on the active
    entries only, as from the sparse decode. With AMX bf16 units this beats the sparse fp32 decode once more
    than `DENSE_BF16_MIN_DENSITY` of the activations are non-zero. Memory: the bf16 copies of the decoders
    live from the forward to the backward, half the decoders' fp32 bytes (transcoders/memory.py counts them)."""

    @staticmethod
    def forward(ctx, acts: torch.Tensor, with_norms: bool, *W_dec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_tokens, n_layers, n_features = acts.shape
        d_model = W_dec[0].shape[-1]
        by_layer = acts.transpose(0, 1).to(torch.bfloat16).contiguous()  # [L, N, F]
        flat = [weight.reshape(n_features, -1).to(torch.bfloat16) for weight in W_dec]  # [F, (L - s) * D]
        out = acts.new_zeros(n_tokens, n_layers * d_model, dtype=torch.float32)  # [N, L * D]
        for source, weight in enumerate(flat):
            out[:, source * d_model:] += by_layer[source] @ weight
        norms = decoder_norms(W_dec) if with_norms else acts.new_zeros(n_layers, n_features)  # [L, F]
        ctx.save_for_backward(norms, by_layer, acts != 0, *W_dec)
        ctx.flat, ctx.shape = flat, acts.shape
        ctx.set_materialize_grads(False)
        return out.view(n_tokens, n_layers, d_model), norms

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_norms: torch.Tensor | None):
        norms, by_layer, active, *W_dec = ctx.saved_tensors
        n_tokens, n_layers, n_features = ctx.shape
        d_model = W_dec[0].shape[-1]
        want_acts = ctx.needs_input_grad[0] and grad_out is not None
        grad_rows = grad_out.reshape(n_tokens, n_layers * d_model).to(torch.bfloat16) if grad_out is not None \
            else None  # [N, L * D]
        grad_acts = by_layer.new_zeros(n_layers, n_tokens, n_features, dtype=torch.float32) if want_acts else None
        grad_weights: list[torch.Tensor | None] = []
        for source, (weight, flat) in enumerate(zip(W_dec, ctx.flat)):
            grad_source = grad_rows[:, source * d_model:] if grad_rows is not None else None  # [N, (L - s) * D]
            if ctx.needs_input_grad[2 + source]:
                flat32 = weight.reshape(n_features, -1)  # [F, (L - s) * D]
                product = by_layer[source].t() @ grad_source if grad_source is not None \
                    else torch.zeros((), dtype=torch.bfloat16)  # acts^T @ grad_out, bf16
                if grad_norms is not None:  # + d|w_f| / dw_f = w_f / |w_f|: one fp32 pass that promotes the product
                    scale = grad_norms[source] / norms[source].clamp_min(1e-30)  # [F]
                    grad = torch.addcmul(product, flat32, scale[:, None])
                else:
                    grad = product.float().expand_as(flat32).contiguous()
                grad_weights.append(grad.view_as(weight))
            else:
                grad_weights.append(None)
            if want_acts:
                grad_acts[source] = grad_source @ flat.t()  # [N, F]
        if want_acts:
            grad_acts = grad_acts.transpose(0, 1) * active  # d out / d a[n, f] only where a[n, f] != 0
        return (grad_acts, None, *grad_weights)


def sparse_decode(acts: torch.Tensor, W_dec: list[torch.Tensor]) -> torch.Tensor:
    """Decode from active features only, no bias: acts [N, L, F], W_dec[s] [F, L - s, D] -> [N, L, D].

    Equals `decode_dense` (outputs, and gradients on the active entries and on W_dec) up to float
    rounding; cost is O(active entries * L * D) instead of O(N * F * L * D).
    """
    _check_dense(acts)
    return _SparseDecode.apply(acts, False, *W_dec)[0]


# the active fraction above which the dense bf16 decode is the cheaper one: at SmolLM2 sizes (N = F = 512, L = 30,
# D = 576), one thread of an AMX CPU, forward + backward cross over between 0.8% and 1.6% active
DENSE_BF16_MIN_DENSITY = 0.01


def decode_with_norms(acts: torch.Tensor, W_dec: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training decode, (`decode_dense(acts, W_dec)`, `decoder_norms(W_dec)`) from one Function, by the cheaper kernel: inside
    bf16 autocast with at least `DENSE_BF16_MIN_DENSITY` of `acts` [N, L, F] non-zero, dense bf16 matmuls
    (`_DenseBf16Decode`); otherwise the sparse fp32 decode. Both give `acts` gradients on active entries only."""
    _check_dense(acts)
    device = acts.device.type
    if (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
            and torch.count_nonzero(acts).item() >= DENSE_BF16_MIN_DENSITY * acts.numel()):
        return _DenseBf16Decode.apply(acts, True, *W_dec)
    return _SparseDecode.apply(acts, True, *W_dec)


def _check_dense(acts: torch.Tensor) -> None:
    if acts.layout != torch.strided or acts.ndim != 3:
        raise ValueError(f"sparse decoding takes a dense [N, L, F] tensor of activations, got {acts.layout} "
                         f"{list(acts.shape)}")


def source_contribution(acts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What one source layer's features write into the MLP outputs of its layer and all later ones:
    acts [n, F], weight = W_dec[s] [F, L - s, D] -> [n, L - s, D]. Sparse: costs O(active * (L - s) * D)."""
    n_features, n_targets, d_model = weight.shape
    return torch.sparse.mm(acts.to_sparse(), weight.reshape(n_features, -1)).view(-1, n_targets, d_model)


def decoder_norms(W_dec: list[torch.Tensor]) -> torch.Tensor:
    """[L, F]: each feature's decoder norm over all the layers it writes to."""
    return torch.stack([torch.linalg.vector_norm(weight, dim=(1, 2)) for weight in W_dec])
