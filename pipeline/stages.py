"""Stage wiring: which function computes each stage, from which inputs, into which directory.

Each entry adapts one stage's plain `run` function to the same call shape
`(config, work_dir, input_dirs, progress) -> summary`; no math lives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import PipelineConfig


@dataclass(frozen=True)
class Stage:
    name: str  # unique id, e.g. "clt_sparse"
    group: str  # what --stages names, e.g. "clt"
    directory: str  # relative output directory, e.g. "clt/sparse"
    section: str  # the config section that (with the inputs) keys this stage's output
    inputs: tuple[str, ...]
    run: Callable[[PipelineConfig, Path, dict[str, Path], bool], dict]


def _run_sparsify(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool) -> dict:
    from sparse_attention import stage as sparsify

    metrics = sparsify.run(config.sparsify, work_dir, progress=progress)
    return {
        "dense_ce": metrics["dense_ce"],
        "sparse_ce": metrics["sparse_ce"],
        "control_ce": metrics["control_ce"],
        "edge_fraction": metrics["edge_fraction"],
        "context_length": metrics["context_length"],
    }


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [
        Stage("sparsify", "sparsify", "sparsify", "sparsify", (), _run_sparsify),
    ]
}
GROUPS = tuple(dict.fromkeys(stage.group for stage in STAGES.values()))


def stages_for(groups: list[str]) -> list[Stage]:
    """The stages of the named groups, in dependency order."""
    return [stage for stage in STAGES.values() if stage.group in groups]
