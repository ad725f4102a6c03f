"""Settings of attribution: graph construction, pruning, attention attribution, and the stage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from prompts.tasks import TASKS
from runtime.precision import PRECISION_DESCRIPTION, Precision


class GraphConfig(BaseModel):
    """How one attribution graph is computed and pruned (circuit-tracer's defaults)."""

    model_config = ConfigDict(extra="forbid")

    max_n_logits: int = Field(10, gt=0, description="at most this many logit targets")
    desired_logit_prob: float = Field(0.95, gt=0, le=1, description="logit targets until this cumulative prob")
    max_feature_nodes: int | None = Field(
        None, gt=0, description="cap on feature nodes, picked by estimated logit influence; None = all active"
    )
    batch_size: int = Field(
        16, gt=0, description="as circuit-tracer's: with max_feature_nodes, update_interval * batch_size "
        "features are visited between influence refreshes (rows do not depend on it)",
    )
    update_interval: int = Field(4, gt=0, description="batches between influence refreshes")
    min_block_rows: int = Field(32, gt=0, description="target rows swept together at least (merging positions)")
    max_block_rows: int = Field(512, gt=0, description="target rows of one position block at most")
    max_grad_mib: int = Field(1024, gt=0, description="memory for the gradients of the blocks swept together")
    node_threshold: float = Field(0.8, ge=0, le=1, description="pruning: share of node influence kept")
    edge_threshold: float = Field(0.98, ge=0, le=1, description="pruning: share of edge influence kept")


class AttentionAttributionConfig(BaseModel):
    """Head loadings of kept edges and QK attribution of the attention edges that carry them."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    layer_min_share: float = Field(
        0.05, ge=0, le=1, description="a layer carries an edge if its attention part is at least this "
        "share of |edge| (otherwise its skip part is nearly the whole edge)",
    )
    head_min_share: float = Field(
        0.05, ge=0, le=1, description="QK-attribute the (layer, head, query, key) of a head part at least "
        "this share of |edge|",
    )
    edge_influence_share: float = Field(
        0.9, gt=0, le=1, description="head-load the kept edges that cross attention and hold this share of "
        "their summed influence on the logits, most influential first (1: every one)",
    )
    qk_top_pairs: int = Field(20, ge=0, description="top (query component, key component) pairs stored")
    qk_top_marginals: int = Field(10, ge=0, description="top components per side stored with their marginals")
    max_attention_edges: int = Field(2000, gt=0, description="QK-attribute at most this many attention edges")


DEFAULT_PROMPTS = (
    'The opposite of "large" is "',
    "When Mary and John went to the store, John gave a drink to",
    "The war lasted from the year 1732 to the year 17",
)


class AttributionStageConfig(BaseModel):
    """Everything the attribution stage needs besides its inputs; saved beside its outputs."""

    model_config = ConfigDict(extra="forbid")

    graph: GraphConfig = GraphConfig()
    attention: AttentionAttributionConfig = AttentionAttributionConfig()
    store_edges: Literal["pruned", "all"] = Field(
        "pruned", description="store the edges kept by pruning, or every nonzero edge"
    )
    prompts: list[str] = Field(list(DEFAULT_PROMPTS), description="free prompts the pipeline attributes (task "
                               "'custom')")
    prompt_sets: dict[str, int] = Field(
        {}, description="task name -> number of clean prompts taken, in file order, from prompts/data/{task}.jsonl",
    )
    precision: Precision = Field("fp32", description="the real model's forward that the replacement model "
                                 "freezes (the graph itself is always computed in fp32): " + PRECISION_DESCRIPTION)
    threads: int | None = Field(None, gt=0, description="torch threads; None = leave as is")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="GiB one prompt's attribution may hold beyond the loaded model and CLT (head "
        "loadings and QK attribution are chunked to fit; a prompt that cannot fit is recorded as a failure); "
        "None = 80% of the memory available to this process (the machine's, its cgroup's, or the Ray task's "
        "`memory` resource less what the process holds)",
    )

    @field_validator("prompt_sets")
    @classmethod
    def _known_tasks(cls, prompt_sets: dict[str, int]) -> dict[str, int]:
        for task, count in prompt_sets.items():
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
            if count <= 0:
                raise ValueError(f"prompt_sets.{task} must be a positive count, not {count}")
        return prompt_sets

    @model_validator(mode="after")
    def _some_prompt(self) -> AttributionStageConfig:
        if not self.prompts and not self.prompt_sets:
            raise ValueError("no prompts: give prompts or prompt_sets")
        return self
