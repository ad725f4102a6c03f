"""The sparsify stage as one plain function: load, calibrate b, post-train (resumable), save, evaluate."""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from runtime.distributed import is_main_rank
from runtime.files import write_directory_atomic, write_json_atomic
from runtime.outputs import open_output_dir
from runtime.resources import peak_rss_gb
from sparse_attention.architectures import require
from sparse_attention.config import SparsifyConfig
from sparse_attention.data import load_token_blocks
from sparse_attention.evaluate import (
    calibrate_offset,
    edge_statistics,
    mean_ce,
    plot_attention_patterns,
    plot_edge_fractions,
    plot_training_curves,
)
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import load_model
from sparse_attention.train import post_train

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "sparsify_config.yaml"
CHECKPOINT_DIR = "checkpoints"


def training_fingerprint(config: SparsifyConfig) -> str:
    """Hash of everything that changes the trained weights (not evaluation or thread settings)."""
    payload = config.model_dump(mode="json", exclude={"eval": True, "train": {"threads", "log_every", "device"}})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def resolve_device(choice: str) -> torch.device:
    """'auto' takes the GPU when there is one; 'cuda' without a GPU is an error, not a silent CPU run."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def run(config: SparsifyConfig, output_dir: str | Path, *, progress: bool = True,
        on_checkpoint: Callable[[dict, Path | None], None] | None = None) -> dict:
    """Post-train `config.model` into gated sparse attention; writes model/, metrics.json, plots.

    Training resumes from `output_dir/checkpoints/`; `on_checkpoint` is passed to `post_train`."""
    output_dir = open_output_dir(output_dir, CONFIG_FILE, config.model_dump(mode="json"))
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    started = time.perf_counter()

    device = resolve_device(config.train.device)
    model, tokenizer = load_model(config.model.name, tiny=config.model.tiny)
    require(model, "sparsify")
    model.to(device)
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    blocks = load_token_blocks(config.data, tokenizer)
    heldout = blocks.heldout[: config.eval.heldout_blocks]
    eval_bs = config.eval.batch_size
    dense_ce = mean_ce(lambda t: reference(input_ids=t).logits, heldout, eval_bs, device)

    gated = GatedModel(model, offset_init=0.0, learn_offset=config.gate.learn_offset).to(device)
    if config.gate.offset_init == "auto":
        offset, trials = calibrate_offset(
            gated, dense_ce, heldout, eval_bs, config.gate.offset_candidates, config.gate.calibration_tolerance
        )
    else:
        offset, trials = float(config.gate.offset_init), []
        with torch.no_grad():
            gated.offsets.fill_(offset)
    untrained_ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, heldout, eval_bs, device)

    result = post_train(
        gated, reference, blocks.train, config.train, config.controller,
        learn_offset=config.gate.learn_offset,
        checkpoint_dir=output_dir / CHECKPOINT_DIR,
        config_fingerprint=training_fingerprint(config),
        progress=progress,
        on_checkpoint=on_checkpoint,
    )
    if not is_main_rank():  # data-parallel workers: rank 0 saves and evaluates
        return {}
    metadata = {"offset_init": offset, "sparsify_config": config.model_dump(mode="json")}
    write_directory_atomic(output_dir / MODEL_DIR, lambda tmp: gated.save(tmp, tokenizer, metadata=metadata))

    sparse_ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, heldout, eval_bs, device)
    control_ce = mean_ce(lambda t: gated.set_mode("dense")(t).logits, heldout, eval_bs, device)
    stats = [edge_statistics(gated, heldout, eval_bs)]
    if config.eval.long_blocks:
        long_blocks = load_token_blocks(config.data, tokenizer, context_length=config.eval.long_context_length)
        long_heldout = long_blocks.heldout[: config.eval.long_blocks]
        stats.append(edge_statistics(gated, long_heldout, max(1, eval_bs // 4)))
        long_bs = max(1, eval_bs // 4)
        long_dense_ce = mean_ce(lambda t: reference(input_ids=t).logits, long_heldout, long_bs, device)
        long_sparse_ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, long_heldout, long_bs, device)
    plot_edge_fractions(stats, output_dir / "edge_fractions.png")
    plot_attention_patterns(gated, tokenizer, config.eval.pattern_prompt, output_dir / "attention_patterns.png")
    plot_training_curves(result.history, output_dir / "training_curves.png")

    metrics = {
        "model": config.model.name,
        "context_length": int(heldout.shape[1]),
        "dense_ce": dense_ce,
        "sparse_ce": sparse_ce,
        "control_ce": control_ce,
        "control_kind": "trained weights with gates removed",
        "untrained_gated_ce": untrained_ce,
        "edge_fraction": stats[0].edge_fraction,
        "edges": stats[0].to_json(),
        "offset_init": offset,
        "offset_calibration": trials,
        "offset_final_mean": float(gated.offsets.mean()),
        "heldout_tokens": int(heldout.numel()),
        "train_tokens_seen": result.tokens_seen,
        "train_steps": result.steps,
        "train_wall_seconds": result.wall_seconds,
        "stage_wall_seconds": time.perf_counter() - started,
        "peak_rss_gb": peak_rss_gb(),
        "history": result.history,
    }
    if config.eval.long_blocks:
        metrics["long_context"] = {**stats[1].to_json(), "dense_ce": long_dense_ce, "sparse_ce": long_sparse_ce,
                                   "heldout_tokens": int(long_heldout.numel())}
        metrics["edge_fraction_long"] = stats[1].edge_fraction
    write_json_atomic(output_dir / METRICS_FILE, metrics)
    return metrics
