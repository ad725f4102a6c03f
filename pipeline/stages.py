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
    sections: tuple[str, ...]  # dotted config paths that (with the inputs) key this stage's output
    inputs: tuple[str, ...]
    run: Callable[[PipelineConfig, Path, dict[str, Path], bool], dict]
    manifest_directory: str | None = None  # where its manifest lives, when stages share `directory`

    @property
    def manifest_dir(self) -> str:
        return self.manifest_directory or self.directory

    def key_payload(self, config: PipelineConfig) -> dict:
        payload = {}
        for dotted in self.sections:
            value = config
            for part in dotted.split("."):
                value = getattr(value, part)
            payload[dotted] = value.model_dump(mode="json")
        return payload


def _sparsify_worker(loop_config: dict) -> None:
    """Ray Train worker: every rank trains on its shard; rank 0 saves and evaluates."""
    import torch

    from sparse_attention import stage as sparsify
    from sparse_attention.config import SparsifyConfig

    torch.set_num_threads(loop_config["threads"])
    sparsify.run(SparsifyConfig.model_validate(loop_config["config"]), loop_config["work_dir"],
                 progress=loop_config["progress"])


def run_data_parallel(worker, loop_config: dict, resources, storage: Path, name: str) -> None:
    """Run `worker(loop_config)` on `resources.num_workers` Ray Train workers with torch DDP (gloo or nccl)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.num_cpus, **({"GPU": max(1, resources.num_gpus)} if resources.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=worker,
        train_loop_config={**loop_config, "threads": max(1, int(resources.num_cpus))},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(storage_path=str(storage.resolve()), name=name),
    )
    trainer.fit()


def _run_sparsify(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool) -> dict:
    import json

    from sparse_attention import stage as sparsify

    resources = config.resources.for_stage("sparsify")
    if resources.num_workers > 1:
        loop_config = {"config": config.sparsify.model_dump(mode="json"), "work_dir": str(work_dir),
                       "progress": progress}
        run_data_parallel(_sparsify_worker, loop_config, resources, work_dir / "ray_train", "sparsify")
        metrics = json.loads((work_dir / sparsify.METRICS_FILE).read_text())
    else:
        metrics = sparsify.run(config.sparsify, work_dir, progress=progress)
    return {
        "dense_ce": metrics["dense_ce"],
        "sparse_ce": metrics["sparse_ce"],
        "control_ce": metrics["control_ce"],
        "edge_fraction": metrics["edge_fraction"],
        "context_length": metrics["context_length"],
    }


def _run_clt(variant: str):
    def run(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool) -> dict:
        from transcoders import stage as clt

        source = config.sparsify.model if variant == "dense" else inputs["sparsify"] / "model"
        metrics = clt.run(config.clt, source, work_dir, progress=progress)
        keys = ("nmse_per_layer", "l0_per_layer", "dead_fraction", "ce_clean", "ce_replaced", "ce_zero_ablated",
                "ce_recovered_fraction", "features")
        return {key: metrics[key] for key in keys if key in metrics}

    return run


def _run_attribution(variant: str):
    def run(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool) -> dict:
        from attribution import stage as attribution

        source = config.sparsify.model if variant == "dense" else inputs["sparsify"] / "model"
        summary = attribution.run(config.attribution, source, inputs[f"clt_{variant}"], None,
                                  work_dir, variant, progress=progress)
        return {"graphs": len(summary["graphs"]), "failures": summary["failures"],
                "skipped": len(summary["skipped"]), "store": summary["store"]}

    return run


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [  # in dependency order
        Stage("sparsify", "sparsify", "sparsify", ("sparsify",), (), _run_sparsify),
        Stage("clt_dense", "clt", "clt/dense", ("clt", "sparsify.model"), (), _run_clt("dense")),
        Stage("clt_sparse", "clt", "clt/sparse", ("clt",), ("sparsify",), _run_clt("sparse")),
        Stage("attribution_dense", "attribution", "graphs", ("attribution", "sparsify.model"), ("clt_dense",),
              _run_attribution("dense"), manifest_directory="graphs/_stages/dense"),
        Stage("attribution_sparse", "attribution", "graphs", ("attribution",), ("sparsify", "clt_sparse"),
              _run_attribution("sparse"), manifest_directory="graphs/_stages/sparse"),
    ]
}
GROUPS = tuple(dict.fromkeys(stage.group for stage in STAGES.values()))


def stages_for(groups: list[str]) -> list[Stage]:
    """The stages of the named groups, in dependency order."""
    return [stage for stage in STAGES.values() if stage.group in groups]
