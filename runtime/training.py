"""The training scaffold every trainer shares: resume from the last checkpoint, a step loop with a progress
bar and one history row per step, a checkpoint every `checkpoint_every` steps and after the last one (rank 0
writes it), the callbacks, and the result; and the learning-rate schedule (`lr_factor`). A trainer supplies
its step and the state only it knows.

Resume is exact: a checkpoint holds the trainer's state, the torch RNG state, the history, the step and the
tokens seen, so a run killed after step k and rerun takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

import torch
from tqdm.auto import tqdm

from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.distributed import is_main_rank


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    history: list[dict]  # one row per step
    steps: int
    tokens_seen: int
    wall_seconds: float
    cpu_seconds: float  # this process's CPU time over the steps run now (all its threads; not since a resume)


class LoopOptions(TypedDict, total=False):
    """What a trainer's caller sets on its TrainingLoop (each trainer takes them as keyword arguments)."""

    checkpoint_dir: Path | None
    progress: bool
    on_step: Callable[[dict], None] | None
    on_checkpoint: Callable[[dict, Path | None], None] | None


@dataclass
class TrainingLoop:
    """One (resumable) training run's bookkeeping. `resume()` first, then `run(...)` with the trainer's step.

    `on_step(row)` is called after every step (and after its checkpoint), e.g. to report progress.
    `on_checkpoint(row, directory)` is called on every rank after each checkpoint, with the directory rank 0
    saved into (None on the other ranks), e.g. to hand it to Ray Train.
    """

    steps: int
    log_every: int
    checkpoint_every: int
    checkpoint_name: str  # the file in checkpoint_dir
    fingerprint: str  # of what changes the trained weights: a checkpoint with another one is refused
    what: str  # the trainer, in checkpoint messages ("training", "CLT")
    label: str  # on the progress bar ("sparsify", "clt")
    checkpoint_dir: Path | None = None  # None: no checkpoints
    progress: bool = True
    on_step: Callable[[dict], None] | None = None
    on_checkpoint: Callable[[dict, Path | None], None] | None = None
    history: list[dict] = field(default_factory=list)  # restored by resume(), one row appended per step
    start_step: int = 0
    tokens_seen: int = 0  # the latest row's "tokens"

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / self.checkpoint_name if self.checkpoint_dir is not None else None

    def resume(self) -> dict | None:
        """The last checkpoint's state (None: start from scratch); restores the history, step, tokens seen and
        the torch RNG state from it. The trainer restores its own entries (weights, optimiser, ...)."""
        if self.checkpoint_dir is None:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(self.checkpoint_path, self.fingerprint, what=self.what)
        if state is not None:
            torch.set_rng_state(state["rng"])
            self.history, self.start_step, self.tokens_seen = state["history"], state["step"], state["tokens_seen"]
        return state

    def run(self, take_step: Callable[[int], dict], trainer_state: Callable[[], dict],
            postfix: Callable[[dict], dict]) -> TrainResult:
        """Steps `start_step`..`steps - 1`. `take_step(step)` trains one step and returns its history row,
        with "step" (step + 1) and "tokens" (tokens seen so far, all ranks); "seconds" is added here.
        `trainer_state()` is what the trainer saves in a checkpoint; `postfix(row)` the progress-bar fields."""
        started, cpu_started = time.perf_counter(), time.process_time()
        bar = tqdm(total=self.steps, initial=self.start_step, desc=self.label,
                   disable=not (self.progress and is_main_rank()), dynamic_ncols=True)
        for step in range(self.start_step, self.steps):
            row = take_step(step)
            row["seconds"] = time.perf_counter() - started
            self.tokens_seen = row["tokens"]
            self.history.append(row)
            bar.update(1)
            if (step + 1) % self.log_every == 0:
                bar.set_postfix(**postfix(row))
            checkpoint_now = self.checkpoint_dir is not None and ((step + 1) % self.checkpoint_every == 0
                                                                  or step + 1 == self.steps)
            if checkpoint_now and is_main_rank():
                save_checkpoint(self.checkpoint_path, {
                    "fingerprint": self.fingerprint,
                    **trainer_state(),
                    "rng": torch.get_rng_state(),
                    "history": self.history,
                    "step": step + 1,
                    "tokens_seen": self.tokens_seen,
                })
            if checkpoint_now and self.on_checkpoint is not None:
                self.on_checkpoint(row, self.checkpoint_dir if is_main_rank() else None)
            if self.on_step is not None:
                self.on_step(row)
        bar.close()
        return TrainResult(self.history, self.steps, self.tokens_seen, time.perf_counter() - started,
                           time.process_time() - cpu_started)
