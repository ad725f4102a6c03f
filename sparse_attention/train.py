"""Sparse attention post-training: minimise the expected open-gate fraction subject to CE staying
within a tolerance of a frozen copy of the original model on the same batch (GECO-style)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparse_attention.checkpoint import load_checkpoint, save_checkpoint
from sparse_attention.config import TrainConfig
from sparse_attention.constraint import ControllerConfig, LagrangeController
from sparse_attention.data import batch_iterator
from sparse_attention.evaluate import next_token_ce, next_token_kl
from sparse_attention.gated_attention import GatedModel

TRAINABLE_PATTERNS = {
    "all": r".",
    "attention": r"self_attn\.",
    "qk": r"self_attn\.(q_proj|k_proj)\.",
}
CHECKPOINT_NAME = "train_state.pt"


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main_rank() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def shard_for_rank(tokens: torch.Tensor) -> torch.Tensor:
    """This worker's equal slice of the global batch (data parallel); the whole batch otherwise."""
    if not is_distributed():
        return tokens
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    if tokens.shape[0] % world:
        raise ValueError(f"train.batch_size {tokens.shape[0]} is not divisible by {world} data-parallel workers")
    per = tokens.shape[0] // world
    return tokens[rank * per : (rank + 1) * per]


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce mean of gradients: with equal shards this is exactly the global-batch gradient."""
    world = torch.distributed.get_world_size()
    for param in params:
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad /= world


def collective_device() -> torch.device:
    """Where collectives take their tensors: NCCL (Ray Train's backend for GPU workers) reduces CUDA tensors only."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average_scalars(totals: dict) -> dict:
    """Mean of float statistics and sum of counts over workers, so every rank's controller agrees."""
    keys = sorted(totals)
    values = torch.tensor([float(totals[k]) for k in keys], dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(values)
    world = torch.distributed.get_world_size()
    return {k: (int(v) if isinstance(totals[k], int) else v / world) for k, v in zip(keys, values.tolist())}


def select_trainable(gated: GatedModel, which: str, learn_offset: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze everything, then unfreeze the weights matching `which`; returns the trainable weights."""
    pattern = re.compile(TRAINABLE_PATTERNS[which])
    chosen = []
    for name, param in gated.model.named_parameters():
        param.requires_grad_(bool(pattern.search(name)))
        if param.requires_grad:
            chosen.append((name, param))
    if not chosen:
        raise ValueError(f"train.trainable={which!r} matches no parameter of {type(gated.model).__name__}")
    gated.offsets.requires_grad_(learn_offset)
    return chosen


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    history: list[dict]  # one row per step: ce, reference_ce, excess, lambda, regulariser, open_fraction, tokens
    steps: int
    tokens_seen: int
    wall_seconds: float


def post_train(
    gated: GatedModel,
    reference: torch.nn.Module,
    train_blocks: torch.Tensor,  # [n_blocks, context]
    train: TrainConfig,
    controller_config: ControllerConfig,
    *,
    learn_offset: bool,
    checkpoint_dir: Path | None = None,
    config_fingerprint: str = "",
    progress: bool = True,
    on_step: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[dict, Path | None], None] | None = None,
) -> TrainResult:
    """Run (or resume) post-training in place on `gated`; `reference` is the frozen original model.

    The constraint is either KL(reference || gated) per token (default: the fine-tuning gain on our
    corpus cannot be spent on sparsity, so the sparse model stays a faithful copy of the original)
    or the batch CE difference to the reference.

    `on_step(row)` is called after every step (and after its checkpoint), e.g. to report progress.
    `on_checkpoint(row, directory)` is called on every rank after each checkpoint, with the directory
    rank 0 saved into (None on the other ranks), e.g. to hand it to Ray Train.
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
    history: list[dict] = []
    start_step, tokens_seen = 0, 0
    ckpt_path = checkpoint_dir / CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt_path is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(ckpt_path, config_fingerprint)
        if state is not None:
            named = dict(weights)
            with torch.no_grad():
                for name, tensor in state["weights"].items():
                    named[name].copy_(tensor)
                gated.offsets.copy_(state["offsets"])
            optimizer.load_state_dict(state["optimizer"])
            controller.load_state_dict(state["controller"])
            torch.set_rng_state(state["rng"])
            history, start_step, tokens_seen = state["history"], state["step"], state["tokens_seen"]

    reference.eval()
    gated.train().set_mode("train", noise=train.gate_noise)
    batches = batch_iterator(train_blocks, train.batch_size, train.seed, start_batch=start_step * train.grad_accumulation)
    started = time.perf_counter()
    bar = tqdm(total=train.steps, initial=start_step, desc="sparsify", disable=not (progress and is_main_rank()),
               dynamic_ncols=True)
    for step in range(start_step, train.steps):
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
        row = {
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
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        bar.update(1)
        if (step + 1) % train.log_every == 0:
            bar.set_postfix(ce=f"{row['ce']:.3f}", **{train.constraint: f"{excess:+.4f}"}, open=f"{row['open_fraction']:.3f}",
                            lam=f"{lam:.3g}", b=f"{row['mean_offset']:.2f}")
        is_last = step + 1 == train.steps
        checkpoint_now = ckpt_path is not None and ((step + 1) % train.checkpoint_every == 0 or is_last)
        if checkpoint_now and is_main_rank():
            save_checkpoint(ckpt_path, {
                "fingerprint": config_fingerprint,
                "weights": {name: p.detach().clone() for name, p in weights},
                "offsets": gated.offsets.detach().clone(),
                "optimizer": optimizer.state_dict(),
                "controller": controller.state_dict(),
                "rng": torch.get_rng_state(),
                "history": history,
                "step": step + 1,
                "tokens_seen": tokens_seen,
            })
        if checkpoint_now and on_checkpoint is not None:
            on_checkpoint(row, checkpoint_dir if is_main_rank() else None)
        if on_step is not None:
            on_step(row)
    bar.close()
    gated.eval().set_mode("eval")
    for param in gated.parameters():
        param.requires_grad_(False)
    return TrainResult(history, train.steps, tokens_seen, time.perf_counter() - started)
