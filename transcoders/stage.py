"""The CLT stage as one plain function: harvest -> train (resumable) -> export -> evaluate -> metrics.json;
then, as its own step, the feature dashboards (`build_features`: `features/` beside the CLT).

The pipeline calls `run` once per model: with a `ModelSpec` for the dense original, and with the
sparsify stage's `model/` directory (a gated checkpoint) for the sparse one. Under torch.distributed
(data parallel, e.g. Ray Train workers) every rank runs `run`: each harvests the same activation stream
and trains on its shard of every batch (transcoders/train.py); rank 0 alone writes checkpoints, the CLT,
metrics and plots.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from runtime.checkpoint import require_resumable
from runtime.distributed import is_main_rank, wait_for_all_ranks
from runtime.files import write_json_atomic
from runtime.outputs import open_output_dir
from runtime.precision import autocast, check_precision, frozen_copy
from runtime.resources import peak_rss_gb
from sparse_attention.architectures import require
from sparse_attention.data import DataConfig, load_token_blocks
from sparse_attention.sources import ModelSource, load_source
from transcoders.cache import build_cache, cache_chunks
from transcoders.clt import CLTConfig, CrossLayerTranscoder, clt_content_id, load_clt, save_clt
from transcoders.config import CLTStageConfig, FeaturesConfig
from transcoders.dashboards import build_dashboards
from transcoders.evaluate import ce_metrics, plot_per_layer, plot_training, reconstruction_metrics
from transcoders.harvest import ShuffleBuffer, harvest_stream, model_shape
from transcoders.memory import GB, check_training_fits
from transcoders.train import CHECKPOINT_NAME, train_clt

__all__ = ["CLTStageConfig", "build_features", "run"]

METRICS_FILE = "metrics.json"
CONFIG_FILE = "clt_config.yaml"
CHECKPOINT_DIR = "checkpoints"


def training_fingerprint(config: CLTStageConfig, identity: dict) -> str:
    """Hash of everything that changes the trained CLT (not evaluation, dashboards, threads, logging or where
    the activation cache lives); `identity` names the model by content (sparse_attention.sources)."""
    payload = {"config": config.model_dump(mode="json", exclude={"eval": True, "memory_budget_gb": True,
                                                                 "cache": {"directory"},
                                                                 "train": {"threads", "log_every",
                                                                           "keep_checkpoint"}}),
               "model": identity}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run(config: CLTStageConfig, model: ModelSource, output_dir: str | Path, *, progress: bool = True,
        on_checkpoint: Callable[[dict, Path | None], None] | None = None,
        device: str | torch.device = "cpu") -> dict:
    """Train a CLT on `model`'s MLPs; writes the CLT (circuit-tracer layout), metrics.json, config and plots.
    Its feature dashboards are a separate step (`build_features`), so changing them never retrains a CLT.

    Training resumes from `output_dir/checkpoints/`; `on_checkpoint` is passed to `train_clt`. The CLT
    trains on `device`; harvesting and evaluation run the LM on the CPU. Data-parallel ranks other than 0
    return {} after training."""
    check_precision(config.precision, "cpu")  # harvesting
    check_precision(config.precision, device)  # training
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    started = time.perf_counter()

    lm, tokenizer, identity = load_source(model)
    require(lm, "harvest")
    fingerprint = training_fingerprint(config, identity)
    require_resumable(Path(output_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME, fingerprint, "CLT")
    output_dir = open_output_dir(output_dir, CONFIG_FILE, config.model_dump(mode="json"))
    blocks = load_token_blocks(config.data, tokenizer)
    n_layers, d_model = model_shape(lm)
    clt_config = CLTConfig(n_layers=n_layers, d_model=d_model, n_features=config.clt.n_features,
                           threshold_init=config.clt.threshold_init, bandwidth=config.clt.bandwidth,
                           skip=config.clt.skip)
    model_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    budget = None if config.memory_budget_gb is None else int(config.memory_budget_gb * GB)
    memory = check_training_fits(clt_config, batch_tokens=config.train.batch_tokens,
                                 buffer_tokens=config.harvest.buffer_tokens, model_bytes=model_bytes,
                                 budget_bytes=budget, precision=config.precision)
    clt = CrossLayerTranscoder(clt_config, seed=config.clt.seed).to(device)

    harvest = config.harvest
    harvest_lm = frozen_copy(lm, config.precision)  # `lm` itself evaluates, in fp32
    if config.cache.enabled:
        cache_dir = config.cache.directory or output_dir / "activations"
        cache_identity = {"model": identity, "data": config.data.model_dump(mode="json"),
                          "harvest": harvest.model_dump(mode="json", include={"batch_size", "seed"}),
                          "precision": config.precision}
        if is_main_rank():
            with autocast(config.precision, "cpu"):  # the LM harvests on the CPU
                build_cache(harvest_lm, blocks.train, cache_dir, identity=cache_identity,
                            batch_size=harvest.batch_size, seed=harvest.seed, max_tokens=config.cache.max_tokens,
                            shard_tokens=config.cache.shard_tokens, progress=progress)
        wait_for_all_ranks()  # the other ranks read the cache rank 0 built

        def chunks(start: int):
            return cache_chunks(cache_dir, (n_layers, d_model), start)
    else:
        def chunks(start: int):
            return harvest_stream(harvest_lm, blocks.train, harvest.batch_size, harvest.seed, start_batch=start,
                                  precision=config.precision)

    def open_source(state: dict | None) -> ShuffleBuffer:
        return ShuffleBuffer(chunks, harvest.buffer_tokens, config.train.batch_tokens, reuse=harvest.reuse,
                             seed=harvest.seed, state=state)

    result = train_clt(clt, open_source, config.train, precision=config.precision,
                       checkpoint_dir=output_dir / CHECKPOINT_DIR, fingerprint=fingerprint,
                       progress=progress, on_checkpoint=on_checkpoint)
    if not is_main_rank():  # data-parallel workers: rank 0 exports and evaluates
        return {}
    save_clt(clt, output_dir, model_name=identity["model_name"],
             extra={"model": identity, "stage_config": config.model_dump(mode="json"),
                    "train_steps": result.steps, "train_tokens": result.tokens_seen})
    del clt  # free it before reading the export back: at SmolLM2 sizes a CLT is gigabytes
    exported = load_clt(output_dir)  # evaluate what was written: the export is checked on every run

    heldout = blocks.heldout[: config.eval.heldout_blocks]
    recon = reconstruction_metrics(lm, exported, heldout, config.eval.batch_size)
    ce = ce_metrics(lm, exported, heldout, config.eval.batch_size)
    metrics = {
        "model": identity,
        "n_layers": n_layers,
        "d_model": d_model,
        "n_features": clt_config.n_features,
        "clt_parameters": clt_config.n_parameters,
        "precision": config.precision,  # of harvest and training; evaluation runs in fp32
        **recon,
        **ce,
        "train_dead_fraction": result.dead_fraction,
        "train_steps": result.steps,
        "train_tokens_seen": result.tokens_seen,
        "train_wall_seconds": result.wall_seconds,
        "train_cpu_seconds": result.cpu_seconds,  # harvest included: the LM forwards run inside the steps
        "memory_estimate_gb": {name: size / GB for name, size in memory.items()},
        "stage_wall_seconds": time.perf_counter() - started,
        "peak_rss_gb": peak_rss_gb(),
        "history": result.history,
    }
    title = f"CLT {identity['kind']} ({n_layers} layers x {clt_config.n_features} features)"
    plot_per_layer(metrics, title, output_dir / "per_layer.png")
    plot_training(result.history, title, output_dir / "training_curves.png")
    write_json_atomic(output_dir / METRICS_FILE, metrics)
    if not config.train.keep_checkpoint:  # the export is the result; the training state is 4x its size
        shutil.rmtree(output_dir / CHECKPOINT_DIR, ignore_errors=True)
    return metrics


def build_features(clt_dir: str | Path, model: ModelSource, features: FeaturesConfig | None = None,
                   data: DataConfig | None = None, *, progress: bool = True) -> dict:
    """Feature dashboards (`features/` in `clt_dir`) of an exported CLT over the held-out split of `data`
    (default: the data the CLT was trained on, from the clt_config.yaml saved beside it)."""
    clt_dir = Path(clt_dir)
    if data is None:
        saved = clt_dir / CONFIG_FILE
        if not saved.is_file():
            raise FileNotFoundError(f"{saved} is missing: pass the data config the CLT was trained with")
        data = CLTStageConfig.model_validate(yaml.safe_load(saved.read_text())).data
    lm, tokenizer, _ = load_source(model)
    clt = load_clt(clt_dir)
    blocks = load_token_blocks(data, tokenizer)
    identity = clt_content_id(clt_dir)  # the weights they describe
    return build_dashboards(lm, clt, tokenizer, blocks.heldout, features or FeaturesConfig(), clt_dir,
                            identity=identity, progress=progress)
