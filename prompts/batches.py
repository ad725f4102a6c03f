"""Prompt sets as model input: prompts of one token length encoded together, bos prefixed, with the
answers of the logit-difference metric as weights and each token's role (`prompts.tasks.token_roles`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prompts.tasks import BOS_ROLE, TaskError, TaskPrompt, invalid_reason, token_ids, token_roles


@dataclass(frozen=True)
class PromptBatch:
    """Prompts of one token length, encoded with bos prefixed; the metric's answers as weights."""

    clean: torch.Tensor  # [batch, pos] long
    corrupted: torch.Tensor  # [batch, pos] long
    answer_ids: torch.Tensor  # [batch, n_answers] long, zero-padded
    answer_weights: torch.Tensor  # [batch, n_answers]: +1/|correct|, -1/|incorrect|, 0 for padding
    indices: tuple[int, ...]  # positions of these prompts in the list given to encode_prompts
    roles: tuple[tuple[str, ...], ...]  # [batch][pos] each token's role, BOS_ROLE first


def encode_prompts(prompts: Sequence[TaskPrompt], tokenizer, batch_size: int = 32) -> list[PromptBatch]:
    """Group prompts by token length (no padding needed) into batches of at most `batch_size`.

    Raises TaskError naming the first prompt that is invalid for `tokenizer`.
    """
    if batch_size < 1:
        raise TaskError(f"batch_size must be positive, got {batch_size}")
    if tokenizer.bos_token_id is None:
        raise TaskError("the tokenizer has no bos token; our models expect bos prefixed to every sequence")
    by_length: dict[int, list[int]] = {}
    encoded = []
    for index, prompt in enumerate(prompts):
        reason = invalid_reason(prompt, tokenizer)
        if reason is not None:
            raise TaskError(f"prompt {index} ({prompt.clean!r}) is invalid for this tokenizer: {reason}")
        clean = [tokenizer.bos_token_id, *token_ids(tokenizer, prompt.clean)]
        corrupted = [tokenizer.bos_token_id, *token_ids(tokenizer, prompt.corrupted)]
        answers = [token_ids(tokenizer, a)[0] for a in prompt.correct + prompt.incorrect]
        weights = [1 / len(prompt.correct)] * len(prompt.correct) + [-1 / len(prompt.incorrect)] * len(
            prompt.incorrect
        )
        roles = (BOS_ROLE, *token_roles(prompt, tokenizer))  # the clean text's roles label both runs
        encoded.append((clean, corrupted, answers, weights, roles))
        by_length.setdefault(len(clean), []).append(index)
    batches = []
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            width = max(len(encoded[i][2]) for i in chunk)
            batches.append(PromptBatch(
                clean=torch.tensor([encoded[i][0] for i in chunk]),
                corrupted=torch.tensor([encoded[i][1] for i in chunk]),
                answer_ids=torch.tensor([_pad(encoded[i][2], width, 0) for i in chunk]),
                answer_weights=torch.tensor([_pad(encoded[i][3], width, 0.0) for i in chunk]),
                indices=tuple(chunk),
                roles=tuple(encoded[i][4] for i in chunk),
            ))
    return batches


def _pad(values: list, width: int, fill) -> list:
    return values + [fill] * (width - len(values))
