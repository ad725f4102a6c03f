"""The task metric: logit difference at the last position, and a model's accuracy on a prompt set."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prompts.batches import PromptBatch, encode_prompts
from prompts.tasks import TaskError, TaskPrompt


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
