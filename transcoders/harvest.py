"""Activation harvesting: MLP inputs and outputs of every layer, from a plain HF causal LM or a GatedModel.

Hooks on the named points `blocks.{l}.ln2.hook_normalized` (the MLP input, after the pre-MLP norm,
gain included: TransformerLens' `blocks.{l}.mlp.hook_in`) and `blocks.{l}.hook_mlp_out` record both.
Position 0 (the start token, an attention sink with outsized MLP outputs) is dropped. The forward
stops after the last MLP, so no logits are computed. `ShuffleBuffer` mixes tokens across blocks
before training, and saves its whole state in the training checkpoint (exact resume).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import torch
from torch import nn
from typing_extensions import Self

from runtime.checkpoint import CheckpointError
from runtime.precision import Precision, autocast
from sparse_attention.data import batch_iterator
from sparse_attention.hook_points import HookFn, hf_model, hooks, layers

Chunk = tuple[torch.Tensor, torch.Tensor]  # (mlp_in [n, L, D], mlp_out [n, L, D])


class _StopForward(Exception):
    """Raised by the last layer's hook: everything after it is not needed for harvesting."""


def mlp_in_point(layer: int) -> str:
    """The hook point of layer `layer`'s MLP input (after the pre-MLP norm): what the CLT reads."""
    return f"blocks.{layer}.ln2.hook_normalized"


def mlp_out_point(layer: int) -> str:
    """The hook point of layer `layer`'s MLP output: what the CLT reconstructs."""
    return f"blocks.{layer}.hook_mlp_out"


def lm_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, pos] -> logits [batch, pos, vocab], for a GatedModel (in its current gate mode) or a HF LM."""
    return model(input_ids=tokens).logits


def model_shape(model: nn.Module) -> tuple[int, int]:
    """(n_layers, d_model) of the LM behind `model`."""
    config = hf_model(model).config
    return config.num_hidden_layers, config.hidden_size


class MLPHooks:
    """Base context manager: while open, the functions of `hook_fns()` are attached to `self.model` by name."""

    model: nn.Module
    n_layers: int
    _attached: ExitStack | None = None

    def hook_fns(self) -> dict[str, HookFn]:
        raise NotImplementedError

    def _reset(self) -> None:
        """State to drop when the context closes."""

    def __enter__(self) -> Self:
        self._attached = ExitStack()
        self._attached.enter_context(hooks(self.model, self.hook_fns()))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._attached.close()
        finally:
            self._reset()


class MLPRecorder(MLPHooks):
    """Context manager: while open, every forward records each layer's MLP input and output (detached)."""

    def __init__(self, model: nn.Module, *, stop_after_last: bool = False):
        self.model, self.n_layers = model, len(layers(model))
        self.stop_after_last = stop_after_last
        self.inputs: list[torch.Tensor | None] = [None] * self.n_layers  # per layer [batch, pos, D]
        self.outputs: list[torch.Tensor | None] = [None] * self.n_layers

    def hook_fns(self) -> dict[str, HookFn]:
        fns = {}
        for layer in range(self.n_layers):
            fns[mlp_in_point(layer)] = self._record_input(layer)
            fns[mlp_out_point(layer)] = self._record_output(layer)
        return fns

    def _record_input(self, layer: int) -> HookFn:
        def record(mlp_in):
            self.inputs[layer] = mlp_in.detach()
        return record

    def _record_output(self, layer: int) -> HookFn:
        def record(mlp_out):
            self.outputs[layer] = mlp_out.detach()
            if self.stop_after_last and layer == self.n_layers - 1:
                raise _StopForward
        return record


@torch.no_grad()
def harvest_batch(model: nn.Module, tokens: torch.Tensor) -> Chunk:
    """[batch, pos] tokens -> (mlp_in, mlp_out), each [batch * (pos - 1), L, D] float32, position 0 dropped."""
    with MLPRecorder(model, stop_after_last=True) as recorder:
        try:
            lm_logits(model, tokens)
        except _StopForward:
            pass
    if any(x is None for x in recorder.inputs):
        raise RuntimeError("an MLP hook did not fire during the forward; is every layer's mlp called?")
    mlp_in = torch.stack(recorder.inputs, dim=2)[:, 1:]  # [batch, pos - 1, L, D]
    mlp_out = torch.stack(recorder.outputs, dim=2)[:, 1:]
    return mlp_in.flatten(0, 1).float(), mlp_out.flatten(0, 1).float()


def harvest_stream(model: nn.Module, blocks: torch.Tensor, batch_size: int, seed: int, start_batch: int = 0,
                   precision: Precision = "fp32") -> Iterator[Chunk]:
    """Endless chunks of activations from shuffled token blocks; chunk k comes from batch k of batch_iterator.
    The LM runs in `precision` on the device of its parameters; the chunks are float32."""
    device = next(model.parameters()).device
    for tokens in batch_iterator(blocks, batch_size, seed, start_batch):
        with autocast(precision, device):  # not around the yield: the consumer runs in its own precision
            chunk = harvest_batch(model, tokens)
        yield chunk


class ShuffleBuffer:
    """Serves random batches from `capacity` buffered tokens: each round serves half the buffer (times
    `reuse`), then refills a random half from `chunks`. Tokens from many blocks mix in every batch.

    `state()` is everything the next batches depend on: the buffered tokens, the unread rest of the last
    chunk read, how many chunks were read, the generator, and this round's order and how much of it was
    served. A buffer opened with `state=` that state serves exactly the batches the saving buffer would
    have served next, so training killed after a checkpoint resumes bit-identically. The state holds the
    buffer: 2 x capacity x L x D float32 in every checkpoint.
    """

    STATE_KEYS = ("chunks_read", "generator", "buffer", "pending", "order", "served")

    def __init__(self, open_chunks, capacity: int, batch_tokens: int, *, reuse: int = 1, seed: int = 0,
                 state: dict | None = None):
        if capacity < 2 * batch_tokens:
            raise ValueError(f"buffer capacity {capacity} must be at least twice batch_tokens {batch_tokens}")
        self.open_chunks = open_chunks  # start_chunk -> iterator of Chunk
        self.capacity, self.batch_tokens, self.reuse = capacity, batch_tokens, reuse
        self.per_round = max(1, reuse * (capacity // 2) // batch_tokens)  # batches served between refills
        self.chunks_read = 0
        self.generator = torch.Generator().manual_seed(seed * 1_000_003)
        self.buffer: Chunk | None = None  # ([capacity, L, D], [capacity, L, D]) once filled
        self.pending: list[Chunk] = []  # read from the stream, not yet in the buffer
        self.order: torch.Tensor | None = None  # [per_round * batch_tokens] buffer slots of this round's batches
        self.served = 0  # batches of this round served
        if state is not None:
            self._restore(state)

    def state(self) -> dict:
        """The state to restart from; it shares the buffer's tensors (no copy of gigabytes), so save or copy it
        before the next batch is drawn."""
        return {"chunks_read": self.chunks_read, "generator": self.generator.get_state(),
                "buffer": None if self.buffer is None else list(self.buffer),
                "pending": [list(chunk) for chunk in self.pending], "order": self.order, "served": self.served}

    def _restore(self, state: dict) -> None:
        missing = [key for key in self.STATE_KEYS if key not in state]
        if missing:
            raise CheckpointError(f"the CLT checkpoint's shuffle-buffer state lacks {missing} (written by a version "
                                  "that could not resume exactly); delete the CLT's checkpoints/ to restart")
        buffer = state["buffer"]
        if buffer is not None and len(buffer[0]) != self.capacity:
            raise CheckpointError(f"the CLT checkpoint's shuffle buffer holds {len(buffer[0])} tokens, the config "
                                  f"{self.capacity}; delete the CLT's checkpoints/ to restart")
        self.chunks_read, self.served, self.order = state["chunks_read"], state["served"], state["order"]
        self.generator.set_state(state["generator"])
        self.buffer = None if buffer is None else (buffer[0], buffer[1])
        self.pending = [(x, y) for x, y in state["pending"]]

    def _take(self, chunks: Iterator[Chunk], n: int) -> Chunk:
        """The next n tokens of the stream (keeping any remainder of the last chunk in `pending`)."""
        have = sum(len(x) for x, _ in self.pending)
        while have < n:
            x, y = next(chunks)
            self.chunks_read += 1
            self.pending.append((x, y))
            have += len(x)
        mlp_in, mlp_out = torch.cat([x for x, _ in self.pending]), torch.cat([y for _, y in self.pending])
        self.pending = [(mlp_in[n:], mlp_out[n:])] if have > n else []
        return mlp_in[:n], mlp_out[:n]

    def __iter__(self) -> Iterator[Chunk]:
        chunks = None

        def take(n: int) -> Chunk:  # the stream opens at the next unread chunk when first needed
            nonlocal chunks
            if chunks is None:
                chunks = self.open_chunks(self.chunks_read)
            return self._take(chunks, n)

        if self.buffer is None:
            store_in, store_out = take(self.capacity)
            self.buffer = (store_in.clone(), store_out.clone())  # [capacity, L, D]
        store_in, store_out = self.buffer
        half = self.capacity // 2
        while True:
            if self.order is None:
                draws = -(-self.per_round * self.batch_tokens // self.capacity)
                order = torch.cat([torch.randperm(self.capacity, generator=self.generator) for _ in range(draws)])
                self.order, self.served = order[: self.per_round * self.batch_tokens], 0
            while self.served < self.per_round:
                index = self.order[self.served * self.batch_tokens:(self.served + 1) * self.batch_tokens]
                self.served += 1  # counted before the yield: state() is read after the batch is used
                yield store_in[index], store_out[index]
            slots = torch.randperm(self.capacity, generator=self.generator)[:half]
            store_in[slots], store_out[slots] = take(half)
            self.order = None
