"""The task metric: logit difference at the last position, a model's accuracy on a prompt set, and the
original vs the sparse model on every task."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from prompts.batches import PromptBatch, encode_prompts
from prompts.tasks import TASKS, TaskError, TaskPrompt, generate_task


def logit_diff(last_logits: torch.Tensor, batch: PromptBatch) -> torch.Tensor:
    """mean correct logit - mean incorrect logit per prompt.  last_logits [batch, vocab] -> [batch]."""
    answer_logits = last_logits.gather(-1, batch.answer_ids)  # [batch, n_answers]
    return (answer_logits * batch.answer_weights.to(last_logits.dtype)).sum(-1)


LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [batch, pos] -> logits [batch, pos, vocab]


def logits_fn(model: torch.nn.Module) -> LogitsFn:
    """ids -> logits for a GatedModel (in its current mode) or a plain HF causal LM."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def task_performance(model_fn: LogitsFn, tokenizer, prompts: Sequence[TaskPrompt], batch_size: int = 32) -> dict:
    """Accuracy (logit diff > 0) and mean logit diff on the clean and the corrupted texts."""
    if not prompts:
        raise TaskError("task_performance needs at least one prompt")
    diffs = {"clean": torch.zeros(len(prompts)), "corrupted": torch.zeros(len(prompts))}
    for batch in encode_prompts(prompts, tokenizer, batch_size):
        for kind, values in diffs.items():
            logits = model_fn(getattr(batch, kind))[:, -1].float()
            values[list(batch.indices)] = logit_diff(logits, batch)
    result: dict = {"n_prompts": len(prompts)}
    for kind, values in diffs.items():
        result[kind] = {"accuracy": (values > 0).float().mean().item(),
                        "mean_logit_diff": values.mean().item(), "std_logit_diff": values.std().item()}
    return result


@torch.no_grad()
def clean_logit_diffs(model_fn: LogitsFn, tokenizer, prompts: Sequence[TaskPrompt], batch_size: int = 32) -> torch.Tensor:
    """Logit difference on each prompt's clean text at the last position, in prompt order.  -> [n_prompts]"""
    if not prompts:
        raise TaskError("clean_logit_diffs needs at least one prompt")
    diffs = torch.zeros(len(prompts))
    for batch in encode_prompts(prompts, tokenizer, batch_size):
        diffs[list(batch.indices)] = logit_diff(model_fn(batch.clean)[:, -1].float(), batch)
    return diffs


def _ratio(sparse: float, dense: float) -> float | None:
    """sparse / dense, or None where dense is not positive (a ratio to a chance-level or reversed model means nothing)."""
    return sparse / dense if dense > 0 else None


def dense_vs_sparse(dense_fn: LogitsFn, sparse_fn: LogitsFn, tokenizer,
                    prompt_sets: Mapping[str, Sequence[TaskPrompt]], batch_size: int = 32) -> dict:
    """Per task: clean accuracy (logit diff > 0) and mean clean logit diff of both models, and sparse / dense
    for each (None where the dense value is not positive)."""
    result = {}
    for task, prompts in prompt_sets.items():
        scores = {}
        for name, fn in (("dense", dense_fn), ("sparse", sparse_fn)):
            diffs = clean_logit_diffs(fn, tokenizer, prompts, batch_size)
            scores[name] = {"accuracy": (diffs > 0).float().mean().item(), "mean_logit_diff": diffs.mean().item()}
        result[task] = {
            "n_prompts": len(prompts), **scores,
            "logit_diff_ratio": _ratio(scores["sparse"]["mean_logit_diff"], scores["dense"]["mean_logit_diff"]),
            "accuracy_ratio": _ratio(scores["sparse"]["accuracy"], scores["dense"]["accuracy"]),
        }
    return result


def task_evaluator(n_prompts: int, seed: int, batch_size: int = 32
                   ) -> Callable[[torch.nn.Module, torch.nn.Module, object], dict]:
    """(original, sparse model, tokenizer) -> `dense_vs_sparse` on `n_prompts` prompts of every task in TASKS,
    generated with `seed` for that tokenizer (the sparsify stage's task evaluation)."""

    def evaluate(original: torch.nn.Module, sparse: torch.nn.Module, tokenizer) -> dict:
        prompt_sets = {task: generate_task(task, tokenizer, n_prompts, seed) for task in TASKS}
        return {"seed": seed, **dense_vs_sparse(logits_fn(original), logits_fn(sparse), tokenizer, prompt_sets,
                                                batch_size)}

    return evaluate
