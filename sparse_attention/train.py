"""Sparse attention post-training: minimise the expected open-gate fraction subject to CE staying
within a tolerance of a frozen copy of the original model on the same batch (GECO-style)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from runtime.checkpoint import CheckpointError
from runtime.distributed import average_gradients, average_scalars, is_distributed, shard_for_rank, world_size
from runtime.precision import autocast, check_precision, frozen_copy, frozen_linear_weights_in_bf16
from runtime.training import LoopOptions, TrainingLoop, TrainResult, lr_factor
from sparse_attention.architectures import trainable_pattern
from sparse_attention.config import TrainConfig
from sparse_attention.constraint import ControllerConfig, StreamMultipliers
from sparse_attention.data import batch_iterator, stream_name
from sparse_attention.evaluate import ce_from_log_probs, kl_from_log_probs, next_token_log_probs
from sparse_attention.gated_attention import GatedModel

if TYPE_CHECKING:
    from typing_extensions import Unpack

CHECKPOINT_NAME = "train_state.pt"
# optimiser step -> (ids [batch, pos] right-padded, answer position [batch]): that step's task-format prompts for
# `train.task_distill` (prompts.training.task_distillation_batches builds one)
TaskBatches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


class TrainingDiverged(RuntimeError):
    """The constraint stayed above `train.divergence_limit` for `train.divergence_steps` steps in a row."""


def controller_constraint(row: dict) -> float:
    """A history row's constraint where the controller measures it: "hard_constraint_value" under the
    deterministic-gate signal, else "constraint_value" (the training gates)."""
    return row["hard_constraint_value"] if "hard_constraint_value" in row else row["constraint_value"]


def divergence(history: list[dict], limit: float | None, steps: int) -> list[dict] | None:
    """The last `steps` history rows when `controller_constraint` is above `limit` in every one of them; None
    when it is not, when there are fewer rows, or when `limit` is None."""
    if limit is None or len(history) < steps:
        return None
    last = history[-steps:]
    return last if all(controller_constraint(row) > limit for row in last) else None


def check_divergence(history: list[dict], train: TrainConfig) -> None:
    """TrainingDiverged, naming the steps and what to change, where `divergence` finds a run of rows."""
    rows = divergence(history, train.divergence_limit, train.divergence_steps)
    if rows is None:
        return
    values = ", ".join(f"{controller_constraint(row):+.3f}" for row in rows)
    raise TrainingDiverged(
        f"sparsify diverged: the {train.constraint} on the controller's gates stayed above train.divergence_limit "
        f"({train.divergence_limit} nats) for {len(rows)} steps (steps {rows[0]['step']}-{rows[-1]['step']}: "
        f"{values}; multiplier {rows[-1]['multiplier']:.3g}); the last checkpoint is kept. Lower train.lr or "
        "raise train.warmup_steps, or set train.divergence_limit: null to train on from that checkpoint")


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


@torch.no_grad()
def hard_gate_constraint(gated: GatedModel, tokens: torch.Tensor, reference_log_probs: torch.Tensor,
                         reference_ce: torch.Tensor, constraint: str, precision: str = "fp32") -> tuple[float, float]:
    """(CE, constraint value) of the deterministic gates (logit > 0) on `tokens` [batch, pos]: one no-grad
    eval-mode forward (under `precision`'s autocast, losses in fp32), after which the model is back in the
    mode and noise setting it had. `reference_log_probs` [batch * (pos - 1), vocab]: the original's."""
    mode, noise, training = gated.mode, gated.noise, gated.training
    gated.eval().set_mode("eval")
    try:
        with autocast(precision, tokens.device):
            logits = gated(tokens).logits
    finally:
        gated.train(training).set_mode(mode, noise=noise)
    log_probs = next_token_log_probs(logits)
    ce = ce_from_log_probs(log_probs, tokens)
    value = kl_from_log_probs(reference_log_probs, log_probs) if constraint == "kl" else ce - reference_ce
    return ce.item(), value.item()


def answer_position_kl(gated: GatedModel, reference: torch.nn.Module, ids: torch.Tensor, answer: torch.Tensor,
                       precision: str) -> torch.Tensor:
    """Mean KL(reference || gated) over prompts of the next-token distribution at each prompt's answer position,
    through the gates as they are set (the noisy training gates in training).  ids [batch, pos] right-padded:
    causal attention keeps the padding out of every earlier position; answer [batch] -> scalar, fp32."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    with autocast(precision, ids.device):
        with torch.no_grad():
            reference_logits = reference(input_ids=ids).logits[rows, answer]  # [batch, vocab]
        logits = gated(ids).logits[rows, answer]
    reference_log_probs = torch.log_softmax(reference_logits.float(), dim=-1)
    return kl_from_log_probs(reference_log_probs, torch.log_softmax(logits.float(), dim=-1))


def _train_step(gated: GatedModel, reference: torch.nn.Module, weights: list[tuple[str, torch.nn.Parameter]],
                optimizer: torch.optim.Optimizer, base_lrs: list[float], multipliers: StreamMultipliers,
                batches: Iterator[torch.Tensor], streams: Iterator[tuple[str, int]], train: TrainConfig, step: int,
                tokens_seen: int, task_batches: TaskBatches | None) -> dict:
    """One optimiser step over `grad_accumulation` global batches (this rank's shard of each when data
    parallel), each weighted by its stream's multiplier (`streams`: the (source, length) of each batch), plus
    `train.task_distill.weight` x the answer-position KL of the step's task prompts (`task_batches`, when the
    weight is above 0); returns the history row (statistics averaged over ranks, "tokens" counted over all
    ranks)."""
    factor = lr_factor(step, train.warmup_steps, train.steps)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base * factor
    optimizer.zero_grad(set_to_none=True)
    totals = {"ce": 0.0, "reference_ce": 0.0, "excess": 0.0, "regulariser": 0.0, "open": 0, "pairs": 0,
              "hard_ce": 0.0, "hard_excess": 0.0, "over_cap": 0.0}
    hard_gates = train.controller_signal == "hard_gates"
    cap_fixed_offset = train.head_cap is not None and train.head_cap_through == "scores"
    signals: dict[str, list[float]] = {}  # per multiplier: the constraint value of each of its batches
    for _ in range(train.grad_accumulation):
        stream = next(streams)
        controller = multipliers[stream]
        tokens = shard_for_rank(next(batches)).to(gated.offsets.device)
        with autocast(train.precision, tokens.device):  # forward passes only; the losses below are fp32
            with torch.no_grad():
                reference_logits = reference(input_ids=tokens).logits
            out = gated(tokens, record_fixed_offset=cap_fixed_offset)
        with torch.no_grad():  # each log-softmax over the vocabulary once: CE and KL share it
            reference_log_probs = next_token_log_probs(reference_logits)
            reference_ce = ce_from_log_probs(reference_log_probs, tokens)
        log_probs = next_token_log_probs(out.logits)
        ce = ce_from_log_probs(log_probs, tokens)
        if train.constraint == "kl":
            excess_term = kl_from_log_probs(reference_log_probs, log_probs)
        else:
            excess_term = ce - reference_ce
        regulariser = out.gate_record.regulariser()
        penalty = regulariser
        if train.head_cap is not None:
            over_cap = out.gate_record.over_cap(train.head_cap, fixed_offset=cap_fixed_offset)
            penalty = regulariser + train.head_cap_weight * over_cap
            totals["over_cap"] += over_cap.item() / train.grad_accumulation
        loss = controller.loss(penalty, excess_term) / train.grad_accumulation
        loss.backward()
        open_edges, pairs = out.gate_record.edge_counts()
        totals["ce"] += ce.item() / train.grad_accumulation
        totals["reference_ce"] += reference_ce.item() / train.grad_accumulation
        totals["regulariser"] += regulariser.item() / train.grad_accumulation
        totals["excess"] += excess_term.item() / train.grad_accumulation
        signal = excess_term.item()
        if hard_gates:
            hard_ce, signal = hard_gate_constraint(gated, tokens, reference_log_probs, reference_ce,
                                                   train.constraint, train.precision)
            totals["hard_ce"] += hard_ce / train.grad_accumulation
            totals["hard_excess"] += signal / train.grad_accumulation
        signals.setdefault(multipliers.key(stream), []).append(signal)
        totals["open"] += int(open_edges.sum())
        totals["pairs"] += int(pairs.sum())
        tokens_seen += tokens.numel() * world_size()
    if train.task_distill.weight > 0:
        ids, answer = task_batches(step)
        what = "train.task_distill.prompts_per_step"
        ids = shard_for_rank(ids, what).to(gated.offsets.device)
        answer = shard_for_rank(answer, what).to(gated.offsets.device)
        task_kl = answer_position_kl(gated, reference, ids, answer, train.precision)
        (train.task_distill.weight * task_kl).backward()
        totals["task_kl"] = task_kl.item()
    if is_distributed():
        average_gradients([p for _, p in weights] + [gated.offsets])
        totals = average_scalars(totals)
        signals = {key: [value] for key, value in average_scalars(
            {key: sum(values) / len(values) for key, values in signals.items()}).items()}
    torch.nn.utils.clip_grad_norm_([p for _, p in weights], train.grad_clip)
    optimizer.step()
    excess = totals["excess"]
    for key, values in signals.items():
        multipliers.controllers[key].update(sum(values) / len(values))
    hard = {"hard_ce": totals["hard_ce"], "hard_ce_excess": totals["hard_ce"] - totals["reference_ce"],
            "hard_constraint_value": totals["hard_excess"]} if hard_gates else {}
    return {
        "step": step + 1,
        "tokens": tokens_seen,
        "context_length": int(tokens.shape[1]),  # of this step's (last) batch: mixed-length training varies it
        "stream": stream_name(stream),  # (source, length) of this step's last batch
        "ce": totals["ce"],
        "reference_ce": totals["reference_ce"],
        "ce_excess": totals["ce"] - totals["reference_ce"],
        "constraint_value": excess,
        **hard,
        "smoothed_violation": controller.smoothed,  # of the last batch's multiplier
        "multiplier": controller.multiplier,
        **({"multipliers": multipliers.multipliers()} if multipliers.config.per_stream else {}),
        "regulariser": totals["regulariser"],
        **({"task_kl": totals["task_kl"]} if "task_kl" in totals else {}),
        **({"over_head_cap": totals["over_cap"]} if train.head_cap is not None else {}),
        "open_fraction": totals["open"] / max(1, totals["pairs"]),
        "mean_offset": gated.offsets_per_head.detach().mean().item(),
    }


def post_train(
    gated: GatedModel,
    reference: torch.nn.Module,
    train_blocks: torch.Tensor | Callable[[int], Iterator[torch.Tensor]],  # [n_blocks, context], or first batch -> batches
    train: TrainConfig,
    controller_config: ControllerConfig,
    *,
    learn_offset: bool,
    streams: Callable[[int], Iterator[tuple[str, int]]] | None = None,
    config_fingerprint: str = "",
    task_batches: TaskBatches | None = None,
    **options: Unpack[LoopOptions],
) -> TrainResult:
    """Run (or resume) post-training in place on `gated`; `reference` is the frozen original model.

    The constraint is either KL(reference || gated) per token (default: the fine-tuning gain on our
    corpus cannot be spent on sparsity, so the sparse model stays a faithful copy of the original)
    or the batch CE difference to the reference. The loss differentiates it through the noisy training
    gates; the controller's lambda follows it measured on the deterministic gates (`train.controller_signal`
    'hard_gates', default) or on the training gates ('train_gates').

    `train_blocks` is shuffled by `batch_iterator`; a callable instead gives the batch iterator that starts at
    a batch index (e.g. `data.mixed_batches` over several sources and lengths), so a resumed run continues exactly.
    `streams` gives, from a batch index, the (source, length) of each batch (e.g. `data.draw_schedule`): the
    history names them, and with `controller_config.per_stream` each has its own multiplier. Without it every
    batch is one stream, ("train", block length). `task_batches` gives each step's task prompts; needed when
    `train.task_distill.weight` > 0.

    `options` (checkpoint_dir, progress, on_step, on_checkpoint) go to `runtime.training.TrainingLoop`.
    """
    if train.task_distill.weight > 0 and task_batches is None:
        raise ValueError("train.task_distill.weight > 0 needs the task prompts (post_train's `task_batches`)")
    if train.threads:
        torch.set_num_threads(train.threads)
    check_precision(train.precision, gated.offsets.device)
    reference = frozen_copy(reference, train.precision)  # its forwards only; bf16 Linear weights under bf16
    weights = select_trainable(gated, train.trainable, learn_offset)
    groups = [{"params": [p for _, p in weights], "lr": train.lr, "weight_decay": train.weight_decay}]
    if learn_offset:
        groups.append({"params": [gated.offsets], "lr": train.offset_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    base_lrs = [g["lr"] for g in groups]
    if streams is None:
        if controller_config.per_stream:
            raise ValueError("controller.per_stream needs the stream of each batch (post_train's `streams`)")
        one_stream = ("train", 0 if callable(train_blocks) else int(train_blocks.shape[1]))

        def streams(start: int) -> Iterator[tuple[str, int]]:
            return itertools.repeat(one_stream)
    multipliers = StreamMultipliers(controller_config)
    loop = TrainingLoop(steps=train.steps, log_every=train.log_every, checkpoint_every=train.checkpoint_every,
                        checkpoint_name=CHECKPOINT_NAME, fingerprint=config_fingerprint, what="training",
                        label="sparsify", **options)
    # the gate noise: its own generator, seeded by the config and checkpointed, so it never depends on what
    # else drew from torch's global generator (model loading, a first-run conversion) or on the device
    noise = torch.Generator(device=gated.offsets.device).manual_seed(train.seed)
    state = loop.resume()
    if state is not None:
        if "gate_noise" not in state:
            raise CheckpointError("the sparsify checkpoint has no gate-noise generator state (written by a version "
                                  "that could not resume exactly); delete its checkpoints/ to restart")
        noise.set_state(state["gate_noise"])
        named = dict(weights)
        with torch.no_grad():
            for name, tensor in state["weights"].items():
                named[name].copy_(tensor)
            gated.offsets.copy_(state["offsets"])
        optimizer.load_state_dict(state["optimizer"])
        multipliers.load_state_dict(state["controller"])

    def trainer_state() -> dict:
        return {"weights": {name: p.detach().clone() for name, p in weights},
                "offsets": gated.offsets.detach().clone(),
                "optimizer": optimizer.state_dict(),
                "controller": multipliers.state_dict(),
                "gate_noise": noise.get_state()}

    def postfix(row: dict) -> dict:
        shown = {"ce": f"{row['ce']:.3f}", train.constraint: f"{row['constraint_value']:+.4f}"}
        if "hard_constraint_value" in row:
            shown["hard"] = f"{row['hard_constraint_value']:+.4f}"
        if "task_kl" in row:
            shown["task_kl"] = f"{row['task_kl']:.4f}"
        return {**shown, "open": f"{row['open_fraction']:.3f}", "lam": f"{row['multiplier']:.3g}",
                "b": f"{row['mean_offset']:.2f}"}

    reference.eval()
    gated.train().set_mode("train", noise=train.gate_noise, generator=noise)
    start_batch = loop.start_step * train.grad_accumulation
    batches = (train_blocks(start_batch) if callable(train_blocks)
               else batch_iterator(train_blocks, train.batch_size, train.seed, start_batch=start_batch))
    batch_streams = streams(start_batch)
    with frozen_linear_weights_in_bf16(gated.model, train.precision):  # the fp32 originals are back after it
        def take_step(step: int) -> dict:
            row = _train_step(gated, reference, weights, optimizer, base_lrs, multipliers, batches, batch_streams,
                              train, step, loop.tokens_seen, task_batches)
            check_divergence([*loop.history, row], train)  # the history survives a resume, so does the count
            return row

        result = loop.run(take_step, trainer_state, postfix)
    gated.eval().set_mode("eval")
    for param in gated.parameters():
        param.requires_grad_(False)
    return result
