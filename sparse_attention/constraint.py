"""GECO-style Lagrange multiplier for "minimise sparsity subject to CE <= reference + tolerance".

The plain multiplicative update oscillates between its clamps on a real model (see issue 3), so
this one is damped three ways: the constraint is smoothed by an EMA, the log-multiplier moves by
a bounded step proportional to the smoothed violation (in units of the tolerance), and the loss
is normalised by 1 + lambda so its scale stays bounded whatever lambda is.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


class ControllerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tolerance: float = Field(0.01, gt=0, description="allowed CE excess over the frozen reference, nats")
    lambda_init: float = Field(1.0, gt=0)
    lambda_min: float = Field(1e-3, gt=0)
    lambda_max: float = Field(1e3, gt=0)
    ema: float = Field(0.9, ge=0, lt=1, description="smoothing of the constraint; 0 = none")
    rate: float = Field(0.05, gt=0, description="log-lambda change per step per tolerance of violation")
    max_log_step: float = Field(0.2, gt=0, description="bound on the log-lambda change in one step")

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
        self.smoothed = violation if self.smoothed is None else cfg.ema * self.smoothed + (1 - cfg.ema) * violation
        step = max(-cfg.max_log_step, min(cfg.max_log_step, cfg.rate * self.smoothed / cfg.tolerance))
        lo, hi = math.log(cfg.lambda_min), math.log(cfg.lambda_max)
        self.log_lambda = max(lo, min(hi, self.log_lambda + step))
        return self.multiplier

    def state_dict(self) -> dict:
        return {"log_lambda": self.log_lambda, "smoothed": self.smoothed}

    def load_state_dict(self, state: dict) -> None:
        self.log_lambda, self.smoothed = float(state["log_lambda"]), state["smoothed"]
