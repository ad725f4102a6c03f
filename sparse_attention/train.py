"""Sparse attention post-training: minimise the expected open-gate fraction subject to CE staying
within a tolerance of a frozen copy of the original model on the same batch (GECO-style)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from runtime.distributed import average_gradients, average_scalars, is_distributed, shard_for_rank, world_size
from runtime.training import LoopOptions, TrainingLoop, TrainResult, lr_factor
from sparse_attention.architectures import trainable_pattern
from sparse_attention.config import TrainConfig
from sparse_attention.constraint import ControllerConfig, LagrangeController
from sparse_attention.data import batch_iterator
from sparse_attention.evaluate import next_token_ce, next_token_kl
from sparse_attention.gated_attention import GatedModel

if TYPE_CHECKING:
    from typing_extensions import Unpack

CHECKPOINT_NAME = "train_state.pt"


def select_trainable(gated: GatedModel, which: str, learn_offset: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the weights matching `which`; returns the trainable weights."""
    pattern = trainable_pattern(gated.model, which)  # the family's weight names
    chosen = []
    for name, param in gated.model.named_parameters():
        param.requires_grad_(bool(pattern.search(name)))
        if param.requires_grad:
            chosen.append((name, param))
    if not chosen:
        raise ValueError(f"train.trainable={which!r} matches no parameter of {type(gated.model).__name__}")
    gated.offsets.requires_grad_(learn_offset)
    return chosen


def _train_step(gated: GatedModel, reference: torch.nn.Module, weights: list[tuple[str, torch.nn.Parameter]],
                optimizer: torch.optim.Optimizer, base_lrs: list[float], controller: LagrangeController,
                batches: Iterator[torch.Tensor], train: TrainConfig, step: int, tokens_seen: int) -> dict:
    """One optimiser step over `grad_accumulation` global batches (this rank's shard of each when data
    parallel); returns the history row (statistics averaged over ranks, "tokens" counted over all ranks)."""
    factor = lr_factor(step, train.warmup_steps, train.steps)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
    optimizer.zero_grad(set_to_none=True)
    totals = {"ce": 0.0, "reference_ce": 0.0, "excess": 0.0, "regulariser": 0.0, "open": 0, "pairs": 0}
    for _ in range(train.grad_accumulation):
        tokens = shard_for_rank(next(batches)).to(gated.offsets.device)
        with torch.no_grad():
            reference_logits = reference(input_ids=tokens).logits
            reference_ce = next_token_ce(reference_logits, tokens)
        out = gated(tokens)
        ce = next_token_ce(out.logits, tokens)
        if train.constraint == "kl":
            excess_term = next_token_kl(reference_logits, out.logits)
        else:
            excess_term = ce - reference_ce
        regulariser = out.gate_record.regulariser()
        loss = controller.loss(regulariser, excess_term) / train.grad_accumulation
        loss.backward()
        open_edges, pairs = out.gate_record.edge_counts()
        totals["ce"] += ce.item() / train.grad_accumulation
        totals["reference_ce"] += reference_ce.item() / train.grad_accumulation
        totals["regulariser"] += regulariser.item() / train.grad_accumulation
        totals["excess"] += excess_term.item() / train.grad_accumulation
        totals["open"] += int(open_edges.sum())
        totals["pairs"] += int(pairs.sum())
        tokens_seen += tokens.numel() * world_size()
    if is_distributed():
        average_gradients([p for _, p in weights] + [gated.offsets])
        totals = average_scalars(totals)
    torch.nn.utils.clip_grad_norm_([p for _, p in weights], train.grad_clip)
    optimizer.step()
    excess = totals["excess"]
    lam = controller.update(excess)
    return {
        "step": step + 1,
        "tokens": tokens_seen,
        "ce": totals["ce"],
        "reference_ce": totals["reference_ce"],
        "ce_excess": totals["ce"] - totals["reference_ce"],
        "constraint_value": excess,
        "smoothed_violation": controller.smoothed,
        "multiplier": lam,
        "regulariser": totals["regulariser"],
        "open_fraction": totals["open"] / max(1, totals["pairs"]),
        "mean_offset": gated.offsets.detach().mean().item(),
    }


def post_train(
    gated: GatedModel,
    reference: torch.nn.Module,
    train_blocks: torch.Tensor,  # [n_blocks, context]
    train: TrainConfig,
    controller_config: ControllerConfig,
    *,
    learn_offset: bool,
    config_fingerprint: str = "",
    **options: Unpack[LoopOptions],
) -> TrainResult:
    """Run (or resume) post-training in place on `gated`; `reference` is the frozen original model.

    The constraint is either KL(reference || gated) per token (default: the fine-tuning gain on our
    corpus cannot be spent on sparsity, so the sparse model stays a faithful copy of the original)
    or the batch CE difference to the reference.

    `options` (checkpoint_dir, progress, on_step, on_checkpoint) go to `runtime.training.TrainingLoop`.
    """
    if train.threads:
        torch.set_num_threads(train.threads)
    weights = select_trainable(gated, train.trainable, learn_offset)
    groups = [{"params": [p for _, p in weights], "lr": train.lr, "weight_decay": train.weight_decay}]
    if learn_offset:
        groups.append({"params": [gated.offsets], "lr": train.offset_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    base_lrs = [g["lr"] for g in groups]
    controller = LagrangeController(controller_config)
    loop = TrainingLoop(steps=train.steps, log_every=train.log_every, checkpoint_every=train.checkpoint_every,
                        checkpoint_name=CHECKPOINT_NAME, fingerprint=config_fingerprint, what="training",
                        label="sparsify", **options)
    state = loop.resume()
    if state is not None:
        named = dict(weights)
        with torch.no_grad():
            for name, tensor in state["weights"].items():
                named[name].copy_(tensor)
            gated.offsets.copy_(state["offsets"])
        optimizer.load_state_dict(state["optimizer"])
        controller.load_state_dict(state["controller"])

    def trainer_state() -> dict:
        return {"weights": {name: p.detach().clone() for name, p in weights},
                "offsets": gated.offsets.detach().clone(),
                "optimizer": optimizer.state_dict(),
                "controller": controller.state_dict()}

    def postfix(row: dict) -> dict:
        return {"ce": f"{row['ce']:.3f}", train.constraint: f"{row['constraint_value']:+.4f}",
                "open": f"{row['open_fraction']:.3f}", "lam": f"{row['multiplier']:.3g}",
                "b": f"{row['mean_offset']:.2f}"}

    reference.eval()
    gated.train().set_mode("train", noise=train.gate_noise)
    batches = batch_iterator(train_blocks, train.batch_size, train.seed,
                             start_batch=loop.start_step * train.grad_accumulation)
    result = loop.run(lambda step: _train_step(gated, reference, weights, optimizer, base_lrs, controller, batches,
                                               train, step, loop.tokens_seen),
                      trainer_state, postfix)
    gated.eval().set_mode("eval")
    for param in gated.parameters():
        param.requires_grad_(False)
    return result
