"""Stage wiring: which function computes each stage, from which inputs, into which directory.

Each entry adapts one stage's plain `run` function to the same call shape
`(config, work_dir, input_dirs, progress, force) -> summary`; no math lives here. `force` (from --force)
matters where a stage keeps finished pieces outside its checkpoints: attribution recomputes stored graphs
and failures. An attribution stage owns its variant of the graph store: it replaces it (graphs of another
model, CLT or settings are deleted before new ones are written).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from attribution import stage as attribution
from comparison.stage import compare_store
from pipeline.artifacts import RAY_TRAIN_DIR
from pipeline.attribution_pool import run_on_actors
from pipeline.config import PipelineConfig
from prompts.metrics import task_evaluator
from prompts.training import task_distillation
from runtime.files import write_atomic
from sparse_attention import stage as sparsify
from sparse_attention.config import ModelSpec, SparsifyConfig
from transcoders import stage as clt
from transcoders.config import CLTStageConfig
from transcoders.features import open_features


@dataclass(frozen=True)
class Stage:
    name: str  # unique id, e.g. "clt_sparse"
    group: str  # what --stages names, e.g. "clt"
    directory: str  # relative output directory, e.g. "clt/sparse"
    sections: tuple[str, ...]  # dotted config paths that (with the inputs) key this stage's output
    inputs: tuple[str, ...]
    run: Callable[[PipelineConfig, Path, dict[str, Path], bool, bool], dict]
    manifest_directory: str | None = None  # where its manifest lives, when stages share `directory`
    outputs: str = ""  # what `directory` holds, for the closing summary
    task_is_a_worker: bool = False  # with num_workers > 1 the stage task works too (attribution), not only waits
    owns: tuple[str, ...] = ()  # glob patterns (within `directory`) of its own files, when stages share `directory`

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


def _resume_from_ray_train(checkpoint_dir: Path) -> None:
    """In a Ray Train worker: rank 0 restores the latest reported checkpoint (if any) into the trainer's
    local checkpoint directory; no rank goes on before it is in place."""
    from ray import train

    latest = train.get_checkpoint()
    if latest is not None and train.get_context().get_world_rank() == 0:
        restore_checkpoint_dir(latest, checkpoint_dir)
    if dist.is_initialized():
        dist.barrier()


def _report_to_ray_train(metric: str) -> Callable[[dict, Path | None], None]:
    """An `on_checkpoint(row, directory)` for a trainer: every rank reports the step and `row[metric]`, and
    rank 0 hands over the directory it saved into (Ray Train uploads it into the run's storage)."""
    from ray import train

    def report(row: dict, directory: Path | None) -> None:
        checkpoint = train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        train.report({"step": row["step"], metric: row[metric]}, checkpoint=checkpoint)

    return report


def _sparsify_worker(loop_config: dict) -> None:
    """Ray Train worker: every rank trains on its shard; rank 0 saves and evaluates.

    Training checkpoints go through Ray Train (reported by every rank, rank 0's directory uploaded into
    the run's storage); a rerun restores the latest one into the stage's checkpoint directory first."""
    torch.set_num_threads(loop_config["threads"])
    work_dir = Path(loop_config["work_dir"])
    _resume_from_ray_train(work_dir / sparsify.CHECKPOINT_DIR)
    config = SparsifyConfig.model_validate(loop_config["config"])
    sparsify.run(config, work_dir, progress=loop_config["progress"], on_checkpoint=_report_to_ray_train("open_fraction"),
                 evaluate_tasks=_sparsify_tasks(config), task_batches=task_distillation(config.train.task_distill))


def _clt_worker(loop_config: dict) -> None:
    """Ray Train worker for a CLT: every rank trains on its shard of each batch, on the device Ray Train gave
    it (its GPU with use_gpu, else the CPU); rank 0 saves, exports and evaluates. Checkpoints go through Ray
    Train as in `_sparsify_worker`."""
    from ray.train.torch import get_device

    torch.set_num_threads(loop_config["threads"])
    work_dir = Path(loop_config["work_dir"])
    _resume_from_ray_train(work_dir / clt.CHECKPOINT_DIR)
    model = loop_config["model"]  # a ModelSpec's fields (dense original) or sparsify's model/ directory
    source = ModelSpec.model_validate(model) if isinstance(model, dict) else model
    clt.run(CLTStageConfig.model_validate(loop_config["config"]), source, work_dir, progress=loop_config["progress"],
            on_checkpoint=_report_to_ray_train("nmse"), device=get_device())


def restore_checkpoint_dir(checkpoint, target: Path) -> None:
    """Copy a Ray Train checkpoint's files over the trainer's local checkpoint directory (each file atomically)."""

    target.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as source:
        for path in Path(source).iterdir():
            if path.is_file():
                write_atomic(target / path.name, lambda tmp, path=path: shutil.copyfile(path, tmp))


def run_data_parallel(worker, loop_config: dict, resources, storage: Path, name: str) -> None:
    """Run `worker(loop_config)` on `resources.num_workers` Ray Train workers with torch DDP (gloo or nccl).

    Checkpoints the workers report go to `storage/name` (inside the stage's work directory); a rerun with the
    same storage and name hands the latest one to the workers (`ray.train.get_checkpoint()`)."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.num_cpus, **({"GPU": max(1, resources.num_gpus)} if resources.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker=worker,
        train_loop_config={**loop_config, "threads": max(1, int(resources.num_cpus))},
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(storage_path=str(storage.resolve()), name=name,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    trainer.fit()


def _sparsify_tasks(config: SparsifyConfig):
    """The sparsify stage's task evaluator (prompts sits above sparse_attention, so the pipeline passes it)."""
    return task_evaluator(config.eval.task_prompts, config.eval.task_seed) if config.eval.task_prompts else None


def _run_sparsify(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool,
                  force: bool) -> dict:


    resources = config.resources.for_stage("sparsify")
    if resources.num_workers > 1:
        loop_config = {"config": config.sparsify.model_dump(mode="json"), "work_dir": str(work_dir),
                       "progress": progress}
        run_data_parallel(_sparsify_worker, loop_config, resources, work_dir / RAY_TRAIN_DIR, "sparsify")
        metrics = json.loads((work_dir / sparsify.METRICS_FILE).read_text())
    else:
        metrics = sparsify.run(config.sparsify, work_dir, progress=progress, evaluate_tasks=_sparsify_tasks(config.sparsify),
                               task_batches=task_distillation(config.sparsify.train.task_distill))
    return {
        "dense_ce": metrics["dense_ce"],
        "sparse_ce": metrics["sparse_ce"],
        "control_ce": metrics["control_ce"],
        "edge_fraction": metrics["edge_fraction"],
        "context_length": metrics["context_length"],
    }


def _run_clt(variant: str):
    def run(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool, force: bool) -> dict:
        source = config.sparsify.model if variant == "dense" else inputs["sparsify"] / "model"
        resources = config.resources.for_stage("clt")
        if resources.num_workers > 1:
            loop_config = {"config": config.clt.model_dump(mode="json"), "work_dir": str(work_dir),
                           "model": source.model_dump(mode="json") if variant == "dense" else str(source),
                           "progress": progress}
            run_data_parallel(_clt_worker, loop_config, resources, work_dir / RAY_TRAIN_DIR, "clt")
            metrics = json.loads((work_dir / clt.METRICS_FILE).read_text())
        else:
            metrics = clt.run(config.clt, source, work_dir, progress=progress)
        keys = ("nmse_per_layer", "l0_per_layer", "dead_fraction", "ce_clean", "ce_replaced", "ce_zero_ablated",
                "ce_recovered_fraction")
        return {key: metrics[key] for key in keys if key in metrics}

    return run


def _run_features(variant: str):
    def run(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool, force: bool) -> dict:

        if not config.features.enabled:
            return {"enabled": False}
        source = config.sparsify.model if variant == "dense" else inputs["sparsify"] / "model"
        summary = clt.build_features(inputs[f"clt_{variant}"], source, config.features, config.clt.data,
                                     progress=progress)
        return {key: summary[key] for key in ("tokens_scanned", "n_examples", "never_active_fraction", "seconds")}

    return run


def _under_ray() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _run_attribution(variant: str):
    def run(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool, force: bool) -> dict:

        source = config.sparsify.model if variant == "dense" else inputs["sparsify"] / "model"
        resources = config.resources.for_stage("attribution")
        if resources.num_workers > 1 and _under_ray():

            summary = run_on_actors(config.attribution, source, inputs[f"clt_{variant}"], work_dir, variant,
                                    resources, progress=progress, force=force, replace=True)
        else:
            summary = attribution.run(config.attribution, source, inputs[f"clt_{variant}"], None,
                                      work_dir, variant, progress=progress, force=force, replace=True)
        return {"graphs": len(summary["graphs"]), "failures": summary["failures"],
                "failures_in_store": summary["failures_in_store"], "skipped": len(summary["skipped"]),
                "removed": len(summary["removed"]), "workers": summary["workers"], "store": summary["store"]}

    return run


def _run_compare(config: PipelineConfig, work_dir: Path, inputs: dict[str, Path], progress: bool,
                 force: bool) -> dict:

    sparsify_dir = inputs["sparsify"]
    labels = {variant: open_features(inputs[f"clt_{variant}"]).labels() for variant in ("dense", "sparse")
              if config.features.enabled}  # else the report names features L{layer}:F{feature}
    summary = compare_store(inputs["attribution_dense"], work_dir, config.compare, dense_model=config.sparsify.model,
                            sparse_model=sparsify_dir / "model", sparsify_metrics=sparsify_dir / "metrics.json",
                            labels=labels, progress=progress)
    return summary


_CLT_OUTPUTS = "W_enc_*.safetensors, W_dec_*.safetensors, config.yaml, metrics.json, per_layer.png"
_FEATURE_OUTPUTS = "feature dashboards (open_features): features.parquet, feature_examples.parquet, features.json"
_GRAPH_OUTPUTS = ("Parquet store (open_store): {{graphs,nodes,edges,head_loadings,qk_pairs}}/variant={variant}/, "
                  "failed prompts in failures/variant={variant}/")

STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in [  # in dependency order
        Stage("sparsify", "sparsify", "sparsify", ("sparsify",), (), _run_sparsify,
              outputs="model/ (gated model), metrics.json, training_curves.png, edge_fractions.png"),
        Stage("clt_dense", "clt", "clt/dense", ("clt", "sparsify.model"), (), _run_clt("dense"),
              outputs=_CLT_OUTPUTS),
        Stage("clt_sparse", "clt", "clt/sparse", ("clt",), ("sparsify",), _run_clt("sparse"), outputs=_CLT_OUTPUTS),
        Stage("features_dense", "features", "clt/dense/features", ("features", "clt.data", "sparsify.model"),
              ("clt_dense",), _run_features("dense"), outputs=_FEATURE_OUTPUTS),
        Stage("features_sparse", "features", "clt/sparse/features", ("features", "clt.data"),
              ("sparsify", "clt_sparse"), _run_features("sparse"), outputs=_FEATURE_OUTPUTS),
        Stage("attribution_dense", "attribution", "graphs", ("attribution", "sparsify.model"), ("clt_dense",),
              _run_attribution("dense"), manifest_directory="graphs/_stages/dense",
              outputs=_GRAPH_OUTPUTS.format(variant="dense"), task_is_a_worker=True,
              owns=("*/variant=dense/*", "dense_*")),
        Stage("attribution_sparse", "attribution", "graphs", ("attribution",), ("sparsify", "clt_sparse"),
              _run_attribution("sparse"), manifest_directory="graphs/_stages/sparse",
              outputs=_GRAPH_OUTPUTS.format(variant="sparse"), task_is_a_worker=True,
              owns=("*/variant=sparse/*", "sparse_*")),
        Stage("compare", "compare", "comparison", ("compare", "sparsify.model"),
              ("sparsify", "clt_dense", "clt_sparse", "features_dense", "features_sparse", "attribution_dense",
               "attribution_sparse"), _run_compare,
              outputs="report.html (+ report_files/*.png), Parquet tables graph_metrics, task_summary, "
                      "circuit_curves, circuit_summary, sparsity, ..."),
    ]
}
GROUPS = tuple(dict.fromkeys(stage.group for stage in STAGES.values()))


def stages_for(groups: list[str]) -> list[Stage]:
    """The stages of the named groups, in dependency order."""
    return [stage for stage in STAGES.values() if stage.group in groups]
