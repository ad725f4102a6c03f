"""Task-format prompts to train on: the sparsify stage's task distillation (`train.task_distill`) reads the
original model's next-token distribution at each prompt's answer position. Prompts come from the training word
lists (`generate_task(..., words="training")`), so no word of an evaluation prompt is ever trained on."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from prompts.tasks import TaskError, generate_task, token_ids
from sparse_attention.config import TaskDistillConfig
from sparse_attention.train import TaskBatches


def padded_clean(texts: Sequence[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean texts with bos prefixed, right-padded with bos: (ids [n, longest], answer position [n], the last
    token of each text). Under causal attention the padding after a text changes none of its positions."""
    if tokenizer.bos_token_id is None:
        raise TaskError("the tokenizer has no bos token; our models expect bos prefixed to every sequence")
    encoded = [[tokenizer.bos_token_id, *token_ids(tokenizer, text)] for text in texts]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.bos_token_id, dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
    return ids, torch.tensor([len(tokens) - 1 for tokens in encoded])


def task_distillation_batches(tokenizer, tasks: Sequence[str], prompts_per_task: int, prompts_per_step: int,
                              seed: int) -> TaskBatches:
    """step -> that step's prompts: task `tasks[step % len(tasks)]`, `prompts_per_step` of its pool of
    `prompts_per_task` training-word prompts drawn without replacement by a generator seeded with (seed, step),
    so a resumed run sees the same prompts. The pools are generated once, here (TaskError for an unknown task
    or too few valid prompts)."""
    if prompts_per_step > prompts_per_task:
        raise TaskError(f"task_distill.prompts_per_step {prompts_per_step} exceeds prompts_per_task "
                        f"{prompts_per_task}")
    pools = [[prompt.clean for prompt in generate_task(task, tokenizer, prompts_per_task, seed, words="training")]
             for task in tasks]

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool = pools[step % len(pools)]
        return padded_clean(random.Random(f"task_distill:{seed}:{step}").sample(pool, prompts_per_step), tokenizer)

    return batch


def task_distillation(config: TaskDistillConfig) -> Callable[[object], TaskBatches] | None:
    """The sparsify stage's builder of `config`'s task prompts (tokenizer -> TaskBatches); None when the
    distillation is off (weight 0)."""
    if config.weight == 0:
        return None
    return lambda tokenizer: task_distillation_batches(tokenizer, config.tasks, config.prompts_per_task,
                                                       config.prompts_per_step, config.seed)
