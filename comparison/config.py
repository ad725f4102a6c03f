"""Settings, errors and output names of the comparison stage."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from circuits.config import ComponentCircuitConfig
from prompts.tasks import TASKS

OUTPUT_FILES = {
    "graph_metrics": "graph_metrics.parquet",  # one row per graph
    "qk_edges": "qk_edges.parquet",  # one row per QK-attributed attention edge of every graph
    "task_summary": "task_summary.parquet",  # per task, metric, variant (and dense/sparse): mean and CI
    "circuit_curves": "circuit_curves.parquet",  # explained effect vs heads / edges kept, per task and variant
    "circuit_summary": "circuit_summary.parquet",  # count at the target effect, dense/sparse ratio, the paper's
    "circuit_prompts": "circuit_prompts.parquet",  # per prompt, variant and kind: its own circuit's count
    "sparsity": "sparsity.parquet",  # open-edge fraction per layer and head (sparsify metrics.json)
    "attention_pattern": "attention_pattern.parquet",  # dense vs sparse attention weights of one prompt
    "examples": "examples.parquet",  # per task and variant: the drawn graph and its strongest attention edge
    "example_qk_pairs": "example_qk_pairs.parquet",  # that edge's top QK pairs, as drawn
}
CONFIG_FILE = "compare_config.yaml"
RATIO = "dense/sparse"
# The paper's component-circuit ratios at ~0.9 explained effect (arXiv 2512.05865: Greater-Than and IOI on GPT-2,
# Docstring and long IOI on OLMo-7B). Only the range over its tasks is known to us, not each task's value.
# Whether its edges are resolved by token is not known to us, so both our edge kinds sit beside its range.
PAPER_RATIOS = {"heads": (1.4, 4.5), "edges": (5.4, 97.0), "role_edges": (5.4, 97.0)}
PAPER_TASKS = "Greater-Than, IOI (GPT-2); Docstring, long IOI (OLMo-7B)"
PAPER_EXAMPLE = 'The opposite of "large" is "'  # the paper's attention-attribution example: the report always shows it


class CompareError(ValueError):
    """A store, output or setting the comparison cannot use; the message says what to do."""


class CircuitsConfig(BaseModel):
    """Component circuits per task on the dense and the sparse model, kept cheap by a prompt count."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    prompts_per_task: int = Field(8, gt=0, description="the first n prompts of prompts/data/{task}.jsonl")
    tasks: list[str] | None = Field(None, description="tasks to run; None = the tasks of the store's graphs")
    circuit: ComponentCircuitConfig = ComponentCircuitConfig(curve_points=12)
    per_prompt: bool = Field(True, description="also trace one circuit per prompt, so the dense/sparse ratio of "
                                               "mean counts has a bootstrap CI over prompts (one more pass over "
                                               "every curve per prompt)")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        unknown = [t for t in tasks or [] if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
        return tasks


class CompareConfig(BaseModel):
    """Settings of the comparison stage; saved beside its outputs."""

    model_config = ConfigDict(extra="forbid")

    influence_shares: list[float] = Field([0.8, 0.9], description="edge-influence shares counted per graph")
    head_min_share: float = Field(0.05, gt=0, le=1, description="a head carries a graph if it holds at least "
                                  "this share of the graph's head-carried |weight|")
    head_cover: float = Field(0.9, gt=0, le=1, description="count the heads holding this share of it")
    qk_top_k: list[int] = Field([1, 5, 10], description="top-k QK pairs whose share of the score is reported")
    bootstrap_samples: int = Field(2000, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    circuits: CircuitsConfig = CircuitsConfig()
    report: bool = Field(True, description="write report.html with its PNGs")
    threads: int | None = Field(None, gt=0, description="torch threads; None = leave as is")

    @field_validator("influence_shares")
    @classmethod
    def _shares(cls, shares: list[float]) -> list[float]:
        if not shares or any(not 0 < s <= 1 for s in shares):
            raise ValueError(f"influence_shares must be in (0, 1], got {shares}")
        return shares

    @field_validator("qk_top_k")
    @classmethod
    def _top_k(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"qk_top_k must be positive counts, got {ks}")
        return ks


def save_compare_config(config: CompareConfig, output_dir: Path) -> Path:
    """Write the settings beside the comparison's outputs (CONFIG_FILE), where the report reads them."""
    path = Path(output_dir) / CONFIG_FILE
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def load_compare_config(output_dir: Path) -> CompareConfig:
    """The settings `save_compare_config` wrote into `output_dir`."""
    path = Path(output_dir) / CONFIG_FILE
    if not path.is_file():
        raise CompareError(f"{output_dir} holds no {CONFIG_FILE}; run compare_store to write it")
    try:
        return CompareConfig.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as err:
        raise CompareError(f"{path} is not a valid comparison config ({err.errors()[0]['msg']}); "
                           "rerun compare_store") from None
