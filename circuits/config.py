"""Settings and errors of component circuits (heads and MLPs as nodes, residual paths as edges)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from runtime.precision import PRECISION_DESCRIPTION, Precision


class CircuitError(ValueError):
    """A model, prompt set or setting that component circuits cannot use."""


class ComponentCircuitConfig(BaseModel):
    """How component circuits are ranked, verified and summarised; saved beside the results."""

    model_config = ConfigDict(extra="forbid")

    split_qkv: bool = Field(True, description="edges into a head end at its q, k or v input (else one input)")
    target: float = Field(0.9, gt=0, le=1, description="explained effect whose head / edge count is reported")
    batch_size: int = Field(16, gt=0, description="prompts per forward pass")
    curve_points: int = Field(20, ge=2, description="counts on each curve (geometric grid, plus 0 and all)")
    refine: bool = Field(True, description="bisect between grid points for the count reaching `target`")
    top_stored: int = Field(100, ge=0, description="top-ranked heads / edges stored by name with their scores")
    gate_gradient: Literal["none", "straight_through"] = Field(
        "straight_through", description="gates' gradient in EAP: none (hard gates, zero) or training's "
                                        "straight-through sigmoid (ignored for models without gates)")
    position_edges: bool = Field(True, description="also trace edges resolved by token position (counted from "
                                                   "the last token), a third curve")
    precision: Precision = Field("bf16", description="every forward and gradient pass (recording, EAP, "
                                 "patching): " + PRECISION_DESCRIPTION)


CURVE_KINDS = ("heads", "edges", "position_edges")  # what a CircuitResult can hold curves of
