"""The sparsify stage as one plain function: load, calibrate b, post-train (resumable), save, evaluate."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from runtime.checkpoint import require_resumable
from runtime.distributed import is_main_rank
from runtime.files import write_directory_atomic, write_json_atomic
from runtime.outputs import open_output_dir
from runtime.resources import peak_rss_gb
from sparse_attention.architectures import require
from sparse_attention.config import SparsifyConfig
from sparse_attention.data import draw_schedule, load_token_blocks, load_training_data, mixed_batches
from sparse_attention.evaluate import (
    calibrate_offset,
    compare_on_heldout,
    edge_statistics,
    mean_ce,
    plot_attention_patterns,
    plot_edge_fractions,
    plot_training_curves,
)
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import load_model
from sparse_attention.train import CHECKPOINT_NAME, TaskBatches, post_train

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "sparsify_config.yaml"
CHECKPOINT_DIR = "checkpoints"
OPEN_HEAD_THRESHOLD = 0.2  # metrics list every head open above this fraction ...
OPEN_HEAD_LENGTH = 512  # ... at this length (the longest compared length when 512 is not among them)

# (original model, gated model in eval mode, tokenizer) -> task-behaviour metrics; the pipeline passes one
# from prompts.metrics (a package above this one)
TaskEvaluator = Callable[[torch.nn.Module, GatedModel, Any], dict]
# tokenizer -> each training step's task prompts for train.task_distill (prompts.training.task_distillation)
TaskBatchesBuilder = Callable[[Any], TaskBatches]


# options added after runs were fingerprinted, whose value here trains exactly as before they existed: left out of
# the fingerprint at that value, so the checkpoints of those runs still resume
LATER_OPTIONS_AT_OLD_BEHAVIOUR = {("controller", "per_stream"): False, ("train", "head_cap"): None,
                                  ("train", "head_cap_weight"): 10.0, ("train", "head_cap_through"): "logits",
                                  ("gate", "closed_heads"): []}


def training_fingerprint(config: SparsifyConfig) -> str:
    """Hash of everything that changes the trained weights (not evaluation, thread settings or the divergence
    stop, which ends a run but changes none of its steps)."""
    changes_no_step = {"threads", "log_every", "device", "divergence_limit", "divergence_steps"}
    payload = config.model_dump(mode="json", exclude={"eval": True, "train": changes_no_step})
    for (section, option), old_behaviour in LATER_OPTIONS_AT_OLD_BEHAVIOUR.items():
        if payload[section][option] == old_behaviour:
            del payload[section][option]
    if payload["train"]["task_distill"]["weight"] == 0:  # off: its other settings change nothing
        del payload["train"]["task_distill"]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def resolve_device(choice: str) -> torch.device:
    """'auto' takes the GPU when there is one; 'cuda' without a GPU is an error, not a silent CPU run."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no GPU is visible; use 'auto' or 'cpu'")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def comparison_lengths(lengths: list[int], model_context: int | None) -> list[int]:
    """The eval lengths, each capped by the model's context (positions it was trained for)."""
    return sorted({min(length, model_context) if model_context else length for length in lengths})


def load_comparison_blocks(config: SparsifyConfig, tokenizer, lengths: list[int]) -> dict[tuple[str, int], torch.Tensor]:
    """Held-out blocks per (source, length): `long_blocks` at the longest length, as many tokens at the others;
    for data.source, every source training mixes, then eval.heldout_sources.

    Loaded before training so that a missing corpus fails at once, not after post-training."""
    sources = list(dict.fromkeys([config.data.source, *config.data.weights(), *config.eval.heldout_sources]))
    budget = config.eval.long_blocks * max(lengths, default=0)
    blocks = {}
    for source in sources:
        data = config.data.model_copy(update={"source": source})
        for length in lengths:
            heldout = load_token_blocks(data, tokenizer, context_length=length).heldout
            blocks[(source, length)] = heldout[: max(1, budget // length)]
    return blocks


def open_heads(comparisons: list[dict], source: str) -> dict:
    """The heads over OPEN_HEAD_THRESHOLD open on `source` at OPEN_HEAD_LENGTH (else the longest length)."""
    on_source = [c for c in comparisons if c["source"] == source]
    chosen = next((c for c in on_source if c["context_length"] == OPEN_HEAD_LENGTH), on_source[-1])
    return {"context_length": chosen["context_length"], "source": source, "threshold": OPEN_HEAD_THRESHOLD,
            "heads": chosen["heads_over_threshold"]}


def run(config: SparsifyConfig, output_dir: str | Path, *, progress: bool = True,
        on_checkpoint: Callable[[dict, Path | None], None] | None = None,
        evaluate_tasks: TaskEvaluator | None = None, task_batches: TaskBatchesBuilder | None = None) -> dict:
    """Post-train `config.model` into gated sparse attention; writes model/, metrics.json, plots.

    Training resumes from `output_dir/checkpoints/`; `on_checkpoint` is passed to `post_train`.
    `evaluate_tasks` (needed when eval.task_prompts > 0) measures task behaviour, dense vs sparse; `task_batches`
    (needed when train.task_distill.weight > 0) builds the task prompts trained on."""
    if config.eval.task_prompts and evaluate_tasks is None:
        raise ValueError("sparsify.eval.task_prompts > 0 needs a task evaluator: run the stage through the pipeline, "
                         "or pass evaluate_tasks (e.g. prompts.metrics.task_evaluator), or set task_prompts 0")
    if config.train.task_distill.weight > 0 and task_batches is None:
        raise ValueError("sparsify.train.task_distill.weight > 0 needs the task prompts: run the stage through the "
                         "pipeline, or pass task_batches (prompts.training.task_distillation), or set the weight 0")
    fingerprint = training_fingerprint(config)
    require_resumable(Path(output_dir) / CHECKPOINT_DIR / CHECKPOINT_NAME, fingerprint)
    output_dir = open_output_dir(output_dir, CONFIG_FILE, config.model_dump(mode="json"))
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    torch.manual_seed(config.train.seed)
    started, started_cpu = time.perf_counter(), time.process_time()

    device = resolve_device(config.train.device)
    model, tokenizer = load_model(config.model.name, tiny=config.model.tiny)
    require(model, "sparsify")
    model.to(device)
    reference = copy.deepcopy(model).eval()
    for param in reference.parameters():
        param.requires_grad_(False)
    model_context = getattr(model.config, "max_position_embeddings", None)
    for field, lengths in (("context_length", [config.data.context_length]),
                           ("long_context_length", config.data.long_lengths())):
        for length in lengths:
            if model_context and length > model_context:
                raise ValueError(f"data.{field} {length} exceeds the model's context {model_context}; lower it")
    distill_batches = task_batches(tokenizer) if config.train.task_distill.weight > 0 else None
    blocks = load_token_blocks(config.data, tokenizer)
    training = load_training_data(config.data, tokenizer, config.train.batch_size, config.train.seed)
    heldout = blocks.heldout[: config.eval.heldout_blocks]
    lengths = comparison_lengths(config.eval.lengths, model_context) if config.eval.long_blocks else []
    comparison_blocks = load_comparison_blocks(config, tokenizer, lengths) if is_main_rank() else {}
    eval_bs = config.eval.batch_size
    dense_ce = mean_ce(lambda t: reference(input_ids=t).logits, heldout, eval_bs, device)

    gated = GatedModel(model, offset_init=0.0, learn_offset=config.gate.learn_offset,
                       offset_scope=config.gate.offset_scope, closed_heads=config.gate.closed_head_indices).to(device)
    if config.gate.offset_init == "auto":
        offset, trials = calibrate_offset(
            gated, dense_ce, heldout, eval_bs, config.gate.offset_candidates, config.gate.calibration_tolerance
        )
    else:
        offset, trials = float(config.gate.offset_init), []
        with torch.no_grad():
            gated.offsets.fill_(offset)
    untrained_ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, heldout, eval_bs, device)

    train_cpu_started = time.process_time()
    result = post_train(
        gated, reference, lambda start: mixed_batches(training, config.train.grad_accumulation, start),
        config.train, config.controller,
        learn_offset=config.gate.learn_offset,
        streams=lambda start: itertools.islice(draw_schedule(config.data, config.train.grad_accumulation), start, None),
        checkpoint_dir=output_dir / CHECKPOINT_DIR,
        config_fingerprint=fingerprint,
        task_batches=distill_batches,
        progress=progress,
        on_checkpoint=on_checkpoint,
    )
    train_cpu_seconds = time.process_time() - train_cpu_started  # all threads of this process: the quiet-machine cost
    if not is_main_rank():  # data-parallel workers: rank 0 saves and evaluates
        return {}
    metadata = {"offset_init": offset, "sparsify_config": config.model_dump(mode="json")}
    write_directory_atomic(output_dir / MODEL_DIR, lambda tmp: gated.save(tmp, tokenizer, metadata=metadata))

    sparse_ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, heldout, eval_bs, device)
    control_ce = mean_ce(lambda t: gated.set_mode("dense")(t).logits, heldout, eval_bs, device)
    stats = [edge_statistics(gated, heldout, eval_bs)]
    comparisons = []
    for (source, length), length_blocks in comparison_blocks.items():
        length_bs = max(1, eval_bs * heldout.shape[1] // length)  # about as many tokens per batch as at training length
        compared = compare_on_heldout(reference, gated, length_blocks, length_bs, source)
        comparisons.append({**compared.to_json(), "heads_over_threshold": compared.edges.heads_over(OPEN_HEAD_THRESHOLD)})
        if source == config.data.source and length != heldout.shape[1]:
            stats.append(compared.edges)
    tasks = evaluate_tasks(reference, gated.eval().set_mode("eval"), tokenizer) if config.eval.task_prompts else None
    plot_edge_fractions(stats, output_dir / "edge_fractions.png")
    plot_attention_patterns(gated, tokenizer, config.eval.pattern_prompt, output_dir / "attention_patterns.png")
    plot_training_curves(result.history, output_dir / "training_curves.png")

    metrics = {
        "model": config.model.name,
        "data_source": config.data.source,
        "train_mix": config.data.weights(),
        "train_lengths": sorted({length for _, length in training.blocks}),
        "context_length": int(heldout.shape[1]),
        "precision": config.train.precision,  # of training; calibration and evaluation run in fp32
        "dense_ce": dense_ce,
        "sparse_ce": sparse_ce,
        "control_ce": control_ce,
        "control_kind": "trained weights with gates removed",
        "untrained_gated_ce": untrained_ce,
        "edge_fraction": stats[0].edge_fraction,
        "edges": stats[0].to_json(),
        "offset_init": offset,
        "offset_calibration": trials,
        "offset_scope": config.gate.offset_scope,
        "closed_heads": config.gate.closed_heads,
        "offset_final_mean": float(gated.offsets_per_head.mean()),
        "offset_final_per_head": gated.offsets_per_head.detach().tolist(),
        "heldout_tokens": int(heldout.numel()),
        "train_tokens_seen": result.tokens_seen,
        "train_steps": result.steps,
        "train_wall_seconds": result.wall_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "stage_wall_seconds": time.perf_counter() - started,
        "stage_cpu_seconds": time.process_time() - started_cpu,
        "threads": torch.get_num_threads(),
        "peak_rss_gb": peak_rss_gb(),
        "history": result.history,
    }
    if comparisons:
        metrics["heldout_by_length"] = comparisons
        metrics["open_heads"] = open_heads(comparisons, config.data.source)
    if tasks is not None:
        metrics["tasks"] = tasks
    write_json_atomic(output_dir / METRICS_FILE, metrics)
    return metrics
