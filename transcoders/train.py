"""CLT training: the loss, per-layer normalisation, and a resumable AdamW loop with a progress bar.

Loss (training units: each layer's input and output divided by its scale, see clt.py):
  sum_l mean_tokens |y_hat_l - y_l|^2 / D                              reconstruction (with the skip paths, if
                                                                       any), summed over layers
  + lambda_s(t) * mean_tokens sum_{l,f} tanh(c * |W_dec,f| * a_f)       |W_dec,f| over all of f's decoders
  + lambda_p * mean_tokens sum_{l,f} relu(-pre_f)                      pushes silent features back up
lambda_s ramps linearly from 0 to its final value over `sparsity_ramp_fraction` of training.

Data parallel (torch.distributed initialised, e.g. by Ray Train): every rank reads the same global batch
and trains on its equal shard; gradients are all-reduced to their mean, which is exactly the global-batch
gradient because each loss term is a mean over tokens. Why the same stream on every rank rather than a
disjoint harvest per rank: the data-dependent init, the shuffle order and the resume state (`source.state()`)
then are those of a single process, so rank 0's checkpoint resumes every rank and W workers take the steps
one worker would. The price is that each rank runs the LM forwards and holds the shuffle buffer; the CLT
step, which dominates at real sizes, is what gets split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from runtime.distributed import (
    average_gradients,
    average_scalars,
    broadcast_from_main,
    is_distributed,
    shard_for_rank,
    true_on_any_rank,
    world_size,
)
from runtime.precision import Precision, autocast
from runtime.training import LoopOptions, TrainingLoop, TrainResult, lr_factor
from transcoders.clt import CrossLayerTranscoder
from transcoders.config import CLTTrainConfig
from transcoders.jumprelu import jumprelu
from transcoders.memory import reuse_freed_memory

if TYPE_CHECKING:
    from typing_extensions import Unpack

CHECKPOINT_NAME = "clt_train_state.pt"


@dataclass
class LossTerms:
    total: torch.Tensor  # scalar, differentiable
    mse_per_layer: torch.Tensor  # [L] mean squared error per element, training units
    sparsity: torch.Tensor  # scalar, before lambda_s
    preact: torch.Tensor  # scalar, before lambda_p
    fvu_per_layer: torch.Tensor  # [L] fraction of variance unexplained on this batch
    l0_per_layer: torch.Tensor  # [L] mean active features per token
    fired: torch.Tensor  # [L, F] bool: active on some token of the batch


def clt_loss(
    clt: CrossLayerTranscoder,
    mlp_in: torch.Tensor,  # [N, L, D] real units
    mlp_out: torch.Tensor,  # [N, L, D]
    *,
    sparsity_coefficient: float,
    sparsity_c: float,
    preact_coefficient: float,
    decode: str = "sparse",
) -> LossTerms:
    """The training loss on one batch; `decode="dense"` uses the reference decoder (same value)."""
    pre = clt.pre_activations(mlp_in)  # [N, L, F]
    acts = jumprelu(pre, clt.threshold, clt.config.bandwidth)
    if decode == "sparse":
        recon, norms = clt.decode_with_norms(acts)  # [N, L, D], [L, F]
    else:
        recon, norms = clt.decode_dense(acts), clt.decoder_norms()
    if clt.W_skip is not None:
        recon = recon + clt.skip_output(mlp_in)
    scale = clt.output_scale[:, None]
    err = (recon - mlp_out) / scale  # [N, L, D]
    mse_per_layer = err.pow(2).mean(dim=(0, 2))
    sparsity = torch.tanh(sparsity_c * norms * acts).sum(dim=(1, 2)).mean()
    preact = -pre.clamp(max=0).sum(dim=(1, 2)).mean()  # = mean_tokens sum relu(-pre)
    total = mse_per_layer.sum() + sparsity_coefficient * sparsity + preact_coefficient * preact
    with torch.no_grad():
        target = mlp_out / scale
        variance = (target - target.mean(0)).pow(2).mean(dim=(0, 2))
        active = acts > 0
        fvu = mse_per_layer.detach() / variance.clamp_min(1e-12)
    return LossTerms(total, mse_per_layer.detach(), sparsity.detach(), preact.detach(), fvu,
                     active.sum(-1).float().mean(0), active.any(0))


SKIP_RIDGE = 1e-3  # ridge of the least-squares skip init, relative to the mean input variance


def least_squares_skip(x: torch.Tensor, y: torch.Tensor, ridge: float = SKIP_RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, the ridge least-squares affine map y ~ x @ W + b (one layer at a time in float64, so the
    temporaries are one layer's).  x, y [N, L, D] -> (W [L, D, D], b [L, D])"""
    x_mean, y_mean = x.mean(0), y.mean(0)  # [L, D]
    W = torch.empty(x.shape[1], x.shape[2], y.shape[2])
    for layer in range(x.shape[1]):
        xc, yc = (x[:, layer] - x_mean[layer]).double(), (y[:, layer] - y_mean[layer]).double()  # [N, D]
        gram = xc.T @ xc  # [D, D]
        gram.diagonal().add_(ridge * gram.diagonal().mean())
        W[layer] = torch.linalg.solve(gram, xc.T @ yc).float()
    return W, y_mean - torch.einsum("li,lio->lo", x_mean, W)


@torch.no_grad()
def encoder_from_decoder(clt: CrossLayerTranscoder) -> None:
    """W_enc[l, f] along W_dec[l][f, 0] (feature f's write into its own layer), every row at the uniform
    init's expected norm sqrt(D / (3 F)): the encoder starts as the own-layer decoders' transpose, rescaled."""
    own = torch.stack([weight[:, 0] for weight in clt.W_dec])  # [L, F, D]
    norm = math.sqrt(clt.d_model / (3 * clt.n_features))
    clt.W_enc.copy_(torch.nn.functional.normalize(own, dim=-1) * norm)


@torch.no_grad()
def initialise_from_data(clt: CrossLayerTranscoder, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         firing_fraction: float | None, skip_init: str = "zero",
                         encoder_init: str = "uniform") -> None:
    """Data-dependent start: per-layer scales (a normalised vector has mean square 1 per element),
    b_dec at the mean output, and, if `firing_fraction` is set, b_enc such that each feature fires on
    that fraction of these tokens. A sparse start keeps early steps cheap: decoding costs grow with L0.
    With a skip path and skip_init "least_squares", W_skip and b_dec start at the affine least-squares fit.
    encoder_init "decoder_transpose" first sets W_enc from the decoders (`encoder_from_decoder`)."""
    if encoder_init == "decoder_transpose":
        encoder_from_decoder(clt)
    elif encoder_init != "uniform":
        raise ValueError(f"encoder_init {encoder_init!r}: use 'uniform' or 'decoder_transpose'")
    mlp_in = torch.cat([x for x, _ in batches])  # [N, L, D]
    mlp_out = torch.cat([y for _, y in batches])
    clt.input_scale.copy_(mlp_in.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-8))
    clt.output_scale.copy_(mlp_out.pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-8))
    clt.b_dec.copy_(mlp_out.mean(0) / clt.output_scale[:, None])
    if clt.W_skip is not None:
        clt.W_skip.zero_()
        if skip_init == "least_squares":
            W, b = least_squares_skip(mlp_in / clt.input_scale[:, None], mlp_out / clt.output_scale[:, None])
            clt.W_skip.copy_(W)
            clt.b_dec.copy_(b)
    if firing_fraction is not None:
        clt.b_enc.zero_()
        pre = clt.pre_activations(mlp_in)  # [N, L, F]
        rank = min(len(pre), max(1, round((1 - firing_fraction) * len(pre))))
        quantile = pre.kthvalue(rank, dim=0).values  # [L, F]: exceeded by about firing_fraction of tokens
        clt.b_enc.copy_(clt.threshold - quantile)


def sparsity_weight(step: int, config: CLTTrainConfig) -> float:
    """lambda_s at `step`: linear ramp from 0 over the first `sparsity_ramp_fraction` of training."""
    ramp = max(1.0, config.sparsity_ramp_fraction * config.steps)
    return config.sparsity_coefficient * min(1.0, step / ramp)


class BatchSource(Protocol):
    """Endless (mlp_in [B, L, D], mlp_out [B, L, D]) batches, with a state to restart from after a kill."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state(self) -> dict: ...


@dataclass
class CLTTrainResult(TrainResult):
    dead_fraction: float  # features silent for dead_window_tokens at the end of training


@dataclass
class _Counters:
    tokens_seen: int
    silent_tokens: torch.Tensor  # [L, F] int64: tokens since each feature last fired


def _train_step(clt: CrossLayerTranscoder, optimizer: torch.optim.Optimizer, mlp_in: torch.Tensor,
                mlp_out: torch.Tensor, config: CLTTrainConfig, step: int, counters: _Counters,
                precision: Precision) -> dict:
    """One optimiser step on one global batch [B, L, D] (this rank's shard of it when data parallel);
    updates `counters` and returns the history row (statistics averaged over ranks: `nmse` is the mean of
    the shards' values, the other terms are means over the global batch)."""
    device = clt.b_dec.device
    mlp_in, mlp_out = shard_for_rank(mlp_in).to(device), shard_for_rank(mlp_out).to(device)
    for group in optimizer.param_groups:
        group["lr"] = config.lr * lr_factor(step, config.warmup_steps, config.steps)
    lambda_s = sparsity_weight(step, config)
    with autocast(precision, device):  # the encoder matmuls; pre-activations come out fp32 (clt.py)
        terms = clt_loss(clt, mlp_in, mlp_out, sparsity_coefficient=lambda_s, sparsity_c=config.sparsity_c,
                         preact_coefficient=config.preact_coefficient, decode=config.decode)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    stats = {"loss": terms.total.item(), "mse": terms.mse_per_layer.sum().item(),
             "nmse": terms.fvu_per_layer.mean().item(), "l0": terms.l0_per_layer.mean().item(),
             "sparsity": terms.sparsity.item(), "preact": terms.preact.item()}
    fired = terms.fired  # [L, F]
    if is_distributed():
        average_gradients(list(clt.parameters()))
        stats = average_scalars(stats)
        fired = true_on_any_rank(fired)  # so every rank's dead-feature bookkeeping agrees
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(clt.parameters(), config.grad_clip)
    optimizer.step()
    with torch.no_grad():
        clt.threshold.clamp_(min=0.0)  # a negative threshold would let negative pre-activations through
    batch_tokens = len(mlp_in) * world_size()
    counters.tokens_seen += batch_tokens
    counters.silent_tokens = torch.where(fired, 0, counters.silent_tokens + batch_tokens)
    return {
        "step": step + 1,
        "tokens": counters.tokens_seen,
        **{key: stats[key] for key in ("loss", "mse", "nmse", "l0", "sparsity", "preact")},
        "lambda_s": lambda_s,
        "dead_fraction": (counters.silent_tokens >= config.dead_window_tokens).float().mean().item(),
    }


def train_clt(
    clt: CrossLayerTranscoder,
    open_source: Callable[[dict | None], BatchSource],
    config: CLTTrainConfig,
    *,
    precision: Precision = "fp32",
    fingerprint: str = "",
    **options: Unpack[LoopOptions],
) -> CLTTrainResult:
    """Train (or resume) `clt` in place, on the device it is on. `open_source(state)` restarts the data
    where `state` left off (None: from the beginning); data parallel, it must serve the same batches on
    every rank. The loss's forward runs in `precision` (runtime/precision.py); parameters, optimizer state and
    the JumpReLU thresholds stay fp32. `options` (checkpoint_dir, progress, on_step, on_checkpoint) go to `runtime.training.TrainingLoop`."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.batch_tokens % world_size():
        raise ValueError(f"clt train.batch_tokens {config.batch_tokens} is not divisible by {world_size()} "
                         "data-parallel workers; change one of them")
    device = clt.b_dec.device
    optimizer = torch.optim.AdamW(clt.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True)
    loop = TrainingLoop(steps=config.steps, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
                        checkpoint_name=CHECKPOINT_NAME, fingerprint=fingerprint, what="CLT", label="clt", **options)
    state = loop.resume()
    if state is not None:
        clt.load_state_dict(state["clt"])
        optimizer.load_state_dict(state["optimizer"])
        counters = _Counters(loop.tokens_seen, state["silent_tokens"].to(device))
        source = open_source(state["source"])
        batches = iter(source)
    else:
        counters = _Counters(0, torch.zeros(clt.n_layers, clt.n_features, dtype=torch.int64, device=device))
        torch.manual_seed(config.seed)
        source = open_source(None)
        batches = iter(source)
        initialise_from_data(clt, [(x.to(device), y.to(device)) for x, y in
                                   (next(batches) for _ in range(config.normalisation_batches))],
                             config.init_firing_fraction, config.skip_init, config.encoder_init)
    if is_distributed():  # ranks that round the data-dependent init differently would otherwise never converge
        broadcast_from_main(clt)

    def trainer_state() -> dict:
        return {"clt": clt.state_dict(), "optimizer": optimizer.state_dict(),
                "silent_tokens": counters.silent_tokens, "source": source.state()}

    def postfix(row: dict) -> dict:
        return {"nmse": f"{row['nmse']:.3f}", "l0": f"{row['l0']:.1f}", "dead": f"{row['dead_fraction']:.2f}"}

    clt.train()
    with reuse_freed_memory():  # each step's gigabytes of temporaries reuse the last step's pages
        result = loop.run(lambda step: _train_step(clt, optimizer, *next(batches), config, step, counters,
                                                     precision),
                          trainer_state, postfix)
    clt.eval()
    dead = (counters.silent_tokens >= config.dead_window_tokens).float().mean().item()
    return CLTTrainResult(**vars(result), dead_fraction=dead)
