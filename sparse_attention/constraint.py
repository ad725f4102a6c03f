"""PI-controlled Lagrange multiplier for "minimise sparsity subject to CE <= reference + tolerance".

A plain multiplicative (pure integral) update oscillates on a real model: with a lagged plant the
multiplier winds down to its floor while CE sits below the reference, then needs tens of steps to
climb back once closing gates push CE far above it (on SmolLM2 such an update swings lambda between 1e-3 and 100).
So, as in PID Lagrangian methods (Stooke et al. 2020), log-lambda follows a PI law, in velocity form:
  e_t = EMA(CE excess - tolerance) / scale                     (scale ~ batch-to-batch CE noise)
  log lambda_t = clip(log lambda_{t-1} + proportional * (e_t - e_{t-1}) + clip(rate * e_t, +-max_log_step),
                      log lambda_min, log lambda_max)
The proportional term reacts at once when the violation grows; the integral term removes the
steady-state error. In velocity form nothing winds up at a clamp: from the floor, lambda rises as soon
as the violation does. The loss is normalised by 1 + lambda so its scale stays bounded whatever lambda is.

With `per_stream`, the constraint holds per training stream (source, length): one multiplier per stream, fed
only that stream's batches and weighting only their CE (a Lagrangian with one term per constraint). One
multiplier over the mix lets a stream that gains (in-domain text at the short length) pay for one that loses
(general English at the long length): the mix stays within tolerance while the worst stream does not.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sparse_attention.data import stream_name


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tolerance: float = Field(0.01, gt=0, description="allowed CE excess over the frozen reference, nats")
    lambda_init: float = Field(1.0, gt=0)
    lambda_min: float = Field(1e-2, gt=0)
    lambda_max: float = Field(1e3, gt=0)
    ema: float = Field(0.8, ge=0, lt=1, description="smoothing of the constraint; 0 = none")
    scale: float = Field(0.1, gt=0, description="violation (nats) that counts as one unit of controller error; "
                                                "about the batch-to-batch noise of the CE excess")
    rate: float = Field(0.02, ge=0, description="integral gain: log-lambda change per step per unit of error")
    proportional: float = Field(0.5, ge=0, description="proportional gain: log-lambda offset per unit of error")
    max_log_step: float = Field(0.2, gt=0, description="bound on the integral's change in one step")
    per_stream: bool = Field(False, description="one multiplier per training stream (source, length), each "
                                                "holding that stream's CE within tolerance; off: one for the mix")

    @model_validator(mode="after")
    def _ordered(self) -> ControllerConfig:
        if not self.lambda_min <= self.lambda_init <= self.lambda_max:
            raise ValueError(
                f"need lambda_min <= lambda_init <= lambda_max, got {self.lambda_min}, "
                f"{self.lambda_init}, {self.lambda_max}"
            )
        return self


class LagrangeController:
    """Holds lambda and the smoothed constraint; `update` after each optimiser step."""

    def __init__(self, config: ControllerConfig):
        self.config = config
        self.log_lambda = math.log(config.lambda_init)
        self.smoothed: float | None = None

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_lambda)

    def loss(self, regulariser: torch.Tensor, ce_excess: torch.Tensor) -> torch.Tensor:
        """(R + lambda * (CE - reference)) / (1 + lambda): the normalised Lagrangian."""
        lam = self.multiplier
        return (regulariser + lam * ce_excess) / (1.0 + lam)

    def update(self, ce_excess: float) -> float:
        """Feed one batch's CE - reference; lambda rises while above tolerance, falls below."""
        cfg = self.config
        violation = ce_excess - cfg.tolerance
        previous = 0.0 if self.smoothed is None else self.smoothed / cfg.scale
        self.smoothed = violation if self.smoothed is None else cfg.ema * self.smoothed + (1 - cfg.ema) * violation
        error = self.smoothed / cfg.scale
        integral_step = max(-cfg.max_log_step, min(cfg.max_log_step, cfg.rate * error))
        step = cfg.proportional * (error - previous) + integral_step
        self.log_lambda = max(math.log(cfg.lambda_min), min(math.log(cfg.lambda_max), self.log_lambda + step))
        return self.multiplier

    def state_dict(self) -> dict:
        return {"log_lambda": self.log_lambda, "smoothed": self.smoothed}

    def load_state_dict(self, state: dict) -> None:
        self.log_lambda, self.smoothed = float(state["log_lambda"]), state["smoothed"]


class StreamMultipliers:
    """The LagrangeController of each training stream ((source, length) of a batch) when `config.per_stream`,
    else one controller for every batch; created at lambda_init on a stream's first batch."""

    def __init__(self, config: ControllerConfig):
        self.config = config
        self.controllers: dict[str, LagrangeController] = {}
        self._seed: dict | None = None  # a single controller's state that new streams start from (load_state_dict)

    def key(self, stream: tuple[str, int]) -> str:
        return stream_name(stream) if self.config.per_stream else "all"

    def __getitem__(self, stream: tuple[str, int]) -> LagrangeController:
        key = self.key(stream)
        if key not in self.controllers:
            self.controllers[key] = LagrangeController(self.config)
            if self._seed is not None:
                self.controllers[key].load_state_dict(self._seed)
        return self.controllers[key]

    def multipliers(self) -> dict[str, float]:
        return {key: controller.multiplier for key, controller in self.controllers.items()}

    def state_dict(self) -> dict:
        return {"per_stream": self.config.per_stream,
                "controllers": {key: c.state_dict() for key, c in self.controllers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s output; a single LagrangeController's state (a run with one multiplier,
        continued with per-stream multipliers) becomes every stream's starting state."""
        self.controllers = {}
        if "controllers" not in state:
            self._seed = dict(state)
            return
        if bool(state["per_stream"]) != self.config.per_stream:
            raise ValueError(f"the checkpoint's multipliers are {'per stream' if state['per_stream'] else 'one'}; "
                             f"controller.per_stream is {self.config.per_stream}")
        for key, controller_state in state["controllers"].items():
            self.controllers[key] = LagrangeController(self.config)
            self.controllers[key].load_state_dict(controller_state)
