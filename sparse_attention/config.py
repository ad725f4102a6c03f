"""The sparsify stage's config: validated on load, saved beside the stage's outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime.precision import AUTO_DESCRIPTION, PRECISION_DESCRIPTION, AutoPrecision
from sparse_attention.constraint import ControllerConfig
from sparse_attention.data import TrainDataConfig
from sparse_attention.models import TinyModelConfig


class ModelSpec(BaseModel):
    """Which model to load: see sparse_attention.models.load_model for the accepted names."""

    model_config = ConfigDict(extra="forbid")

    name: str = "smollm2-135m"
    tiny: TinyModelConfig | None = None

    @model_validator(mode="after")
    def _tiny_only_for_tiny(self) -> ModelSpec:
        if self.tiny is not None and self.name != "tiny":
            raise ValueError(f"model.tiny is only used with model.name 'tiny', not {self.name!r}")
        return self


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    offset_init: float | Literal["auto"] = Field(
        "auto", description="initial b; 'auto' picks the smallest candidate within calibration_tolerance of dense"
    )
    offset_candidates: list[float] = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0]
    calibration_tolerance: float = Field(0.01, gt=0, description="nats the untrained gated model may lose")
    learn_offset: bool = Field(True, description="train b with offset_lr")
    offset_scope: Literal["model", "layer", "head"] = Field(
        "head", description="one b for the whole model (the paper's scalar), one per layer, or one per layer and head"
    )
    closed_heads: list[str] = Field([], description="heads whose gates stay shut in training and evaluation, "
                                    "e.g. ['L2H4'] (layer 2, head 4): they write nothing and hold no edge. "
                                    "bench/open_heads_probe.py measures what closing each costs")

    @field_validator("closed_heads")
    @classmethod
    def _head_names(cls, names: list[str]) -> list[str]:
        heads = [parse_head(name) for name in names]
        if len(set(heads)) != len(heads):
            raise ValueError(f"closed_heads names a head twice: {names}")
        return names

    @property
    def closed_head_indices(self) -> list[tuple[int, int]]:
        """closed_heads as (layer, head) pairs."""
        return [parse_head(name) for name in self.closed_heads]


def parse_head(name: str) -> tuple[int, int]:
    """'L2H4' -> (2, 4): layer 2, head 4."""
    layer, _, head = name.upper().removeprefix("L").partition("H")
    if not (name.upper().startswith("L") and layer.isdigit() and head.isdigit()):
        raise ValueError(f"head {name!r} is not of the form L<layer>H<head>, e.g. L2H4")
    return int(layer), int(head)


class TaskDistillConfig(BaseModel):
    """Task-format distillation: KL(original || sparse) at the answer position of generated task prompts, beside
    the held-out-text constraint. The prompts come from the training word lists (`prompts.tasks.TRAIN_*`: the
    evaluation's templates, no word of any evaluation prompt); the pipeline builds them."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(0.0, ge=0, description="weight of the prompts' mean KL in the loss (the normalised "
                          "Lagrangian has weight 1 on the regulariser at lambda 0); 0 = off")
    tasks: list[str] = Field(["ioi", "greater_than", "docstring", "antonyms", "induction"], min_length=1,
                             description="tasks in turn, one per step")
    prompts_per_task: int = Field(128, gt=0, description="the pool drawn from, per task")
    prompts_per_step: int = Field(8, gt=0, description="prompts of one task per optimiser step")
    seed: int = Field(0, description="seed of the pool and of each step's draw")

    @field_validator("tasks")
    @classmethod
    def _each_task_once(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task_distill.tasks names a task twice: {tasks}")
        return tasks


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trainable: Literal["all", "attention", "qk"] = "attention"
    constraint: Literal["kl", "ce_excess"] = Field(
        "kl", description="what must stay below controller.tolerance: KL to the original, or CE - original CE"
    )
    controller_signal: Literal["hard_gates", "train_gates"] = Field(
        "hard_gates", description="where the controller measures the constraint: the deterministic gates "
        "(logit > 0, the model evaluation and attribution use; one extra no-grad forward per batch) or the noisy "
        "training gates of the loss")
    steps: int = Field(300, gt=0, description="optimiser steps")
    batch_size: int = Field(4, gt=0)
    grad_accumulation: int = Field(1, gt=0)
    lr: float = Field(3e-5, gt=0)
    offset_lr: float = Field(0.05, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    gate_noise: bool = Field(True, description="logistic noise on training gates; off for determinism checks")
    checkpoint_every: int = Field(25, gt=0)
    log_every: int = Field(1, gt=0)
    head_cap: float | None = Field(None, gt=0, lt=1, description="with a value: the penalty also holds "
                                   "head_cap_weight x the mean over layers and heads of max(0, a head's expected "
                                   "open fraction - head_cap), pushing the heads above the cap down beside the "
                                   "mean; None: the regulariser alone")
    head_cap_weight: float = Field(10.0, gt=0, description="weight of the head_cap term (the regulariser has 1)")
    head_cap_through: Literal["logits", "scores"] = Field(
        "logits", description="what the head_cap term's gradient moves: the gate logits (each head's queries and "
        "keys, and the shared offset with them) or the scores alone (the offset held fixed in that term)")
    task_distill: TaskDistillConfig = TaskDistillConfig()
    divergence_limit: float | None = Field(
        0.5, gt=0, description="nats: stop the run with TrainingDiverged when the constraint (CE excess or KL, "
        "measured where the controller measures it) stays above this for divergence_steps consecutive steps; the "
        "last checkpoint is kept. None: never stop")
    divergence_steps: int = Field(4, gt=0, description="consecutive steps above divergence_limit that stop the run")
    seed: int = 0
    threads: int | None = Field(None, gt=0, description="torch threads; None = leave as is")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: AutoPrecision = Field("auto", validate_default=True, description="training forward passes: "
                                     + PRECISION_DESCRIPTION + AUTO_DESCRIPTION)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    heldout_blocks: int = Field(64, gt=0, description="held-out blocks at the training context length")
    lengths: list[int] = Field([128, 512, 1024], description="context lengths of the held-out comparison "
                                                             "(CE, KL, edges); capped by the model's context")
    long_blocks: int = Field(8, ge=0, description="held-out blocks at the longest of `lengths`; shorter lengths "
                                                  "get as many tokens (0 skips the comparison)")
    heldout_sources: list[str] = Field([], description="more data sources (e.g. 'brown') compared on their held-out "
                                                       "split, besides data.source; never trained on")
    task_prompts: int = Field(0, ge=0, description="prompts per task for dense vs sparse task behaviour (0 skips)")
    task_seed: int = Field(1, description="seed of the generated task prompts (prompts/data holds seed 0's)")
    batch_size: int = Field(8, gt=0)
    pattern_prompt: str = "When Mary and John went to the store, John gave a drink to"

    @field_validator("lengths")
    @classmethod
    def _lengths_at_least_two(cls, value: list[int]) -> list[int]:
        if any(length < 2 for length in value):
            raise ValueError(f"every eval length must be >= 2 (start token + 1 text token), got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _lengths_when_compared(self) -> EvalConfig:
        if self.long_blocks and not self.lengths:
            raise ValueError("eval.lengths is empty but eval.long_blocks > 0; give lengths or set long_blocks 0")
        return self


class SparsifyConfig(BaseModel):
    """Everything the sparsify stage needs; `model_dump()` is saved as sparsify_config.yaml."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSpec = ModelSpec()
    data: TrainDataConfig = TrainDataConfig()
    gate: GateConfig = GateConfig()
    train: TrainConfig = TrainConfig()
    controller: ControllerConfig = ControllerConfig()
    eval: EvalConfig = EvalConfig()
    regulariser_weighting: Literal["mean_over_layers_and_heads"] = "mean_over_layers_and_heads"
