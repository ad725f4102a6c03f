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
    edge_batch_tokens: int = Field(512, gt=0, description="edge patching runs several masks (curve points, "
                                   "faithfulness edges) per forward as stacked copies of a batch, at most this many "
                                   "tokens per forward (at least one copy); each token holds every writer's "
                                   "difference: SmolLM2, 301 x 576 floats, 0.7 MB")
    curve_points: int = Field(20, ge=2, description="counts on each curve (geometric grid, plus 0 and all)")
    refine: bool = Field(True, description="bisect the last gaps below the first crossing and the stays-above count")
    dense_points: int = Field(16, ge=0, description="counts evaluated evenly between the grid count before the "
                                                    "first crossing and the stays-above count (the curves are not "
                                                    "monotone: one gate flip can move a crossing)")
    top_stored: int = Field(100, ge=0, description="top-ranked heads / edges stored by name with their scores")
    gate_gradient: Literal["none", "straight_through"] = Field(
        "straight_through", description="gates' gradient in EAP: none (hard gates, zero) or training's "
                                        "straight-through sigmoid (ignored for models without gates)")
    role_edges: bool = Field(True, description="also trace edges resolved by token role (IOI's S1, IO, S2, ..., "
                                               "the task generator's roles: prompts.tasks.token_roles), a third curve")
    # fp32 by default: under bf16 near-tied EAP-IG edge scores swap ranks, which moves the first crossing of a
    # non-monotone edge curve (tests/test_precision.py: 9 -> 11 edges on a tiny model; heads stay equal)
    precision: Precision = Field("fp32", description="every forward and gradient pass (recording, ranking, "
                                 "patching): " + PRECISION_DESCRIPTION)
    head_ranking: Literal["exact", "eap"] = Field(
        "exact", description="heads ranked by exact single-head patching (one pass per head) or by EAP node scores")
    edge_ranking: Literal["eap_ig", "eap"] = Field(
        "eap_ig", description="edges ranked by EAP-IG (gradients averaged over embeddings interpolated between "
                              "corrupted and clean) or EAP (the clean run's gradient)")
    ig_steps: int = Field(5, ge=1, description="EAP-IG interpolation points (midpoints of equal parts of [0, 1])")
    gates: Literal["frozen", "recomputed"] = Field(
        "frozen", description="headline verification mode of a gated model: gates frozen to the clean run's masks "
                              "in every ranking and patching pass (the circuit as a fixed structure, so one gate "
                              "flip cannot set a count and the gradient is that of the verified function), or "
                              "recomputed from each pass's inputs (the model as it runs)")
    other_gates: bool = Field(True, description="also trace a gated model with the other gate mode (reported beside)")
    faithfulness_edges: int = Field(32, ge=0, description="edges whose exact single-edge patching effect is compared "
                                                          "with their ranking score (half top-ranked, half random)")
    min_clean_logit_diff: float = Field(1.0, description="behaviour gate: a task enters a dense/sparse ratio only if "
                                                         "both models' mean clean logit diff reaches this")
    min_clean_accuracy: float = Field(0.8, ge=0, le=1, description="behaviour gate: and both models' clean accuracy "
                                                                  "(share of prompts with logit diff > 0) reaches this")
    min_prompt_gap: float = Field(0.5, ge=0, description="per-prompt circuits: prompts whose clean - corrupted logit "
                                                         "diff is under this are dropped (their normalised effect "
                                                         "is unstable), and counted")
    seed: int = Field(0, description="seed of the faithfulness sample and the bootstrap")
    bootstrap_samples: int = Field(2000, gt=0, description="bootstrap resamples of prompts for count CIs")


GATE_MODES = ("frozen", "recomputed")
CURVE_KINDS = ("heads", "edges", "role_edges")  # what a CircuitResult can hold curves of
