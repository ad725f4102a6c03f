"""Text data for every stage: fixed-length token blocks with a held-out split, from one place.

The documents come from the source named by ``DataConfig.source`` (``sparse_attention.corpora``: the
Python docs by default, a local file or folder, or a streamed ``hf:`` dataset). Each document is
tokenized without special tokens; documents are assigned to train or held-out by a stable hash of
their id (relative path, or record index for ``hf:``), so adding files does not reshuffle the split.
Each split's documents are joined with the end-of-text token between them and cut into blocks of
``context_length - 1`` tokens, each prefixed with the start token. Token ids are cached as ``.npy``
under ``$SPARSE_ATTN_CACHE/tokens`` (default ``~/.cache/sparse-attention-interp/tokens``), keyed by the
source's identity, the tokenizer and ``CLEANING_VERSION``. Batches for training and evaluation are
drawn from the blocks here too (``batch_iterator``, ``iterate_blocks``).

The sparsify stage's training may mix sources and lengths (``TrainDataConfig``: ``mix`` weights, every
``long_every``-th step at ``long_context_length``); ``load_training_data`` loads the train split of each
(source, length) and ``mixed_batches`` interleaves them in a fixed order that resumes exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydantic
import torch

from runtime.files import write_atomic, write_json_atomic
from sparse_attention.corpora import TextSource, open_source, parse_hf_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CLEANING_VERSION = "rst-clean-v1"  # bump when corpora.clean_rst or the stream layout changes: invalidates caches
DEFAULT_CACHE_DIR = "~/.cache/sparse-attention-interp"
_TOKENIZE_BATCH_DOCS = 32


class DataConfig(pydantic.BaseModel, extra="forbid"):
    """Where text comes from and how it is cut into blocks; saved beside each stage's outputs."""

    source: str = "python-docs"  # "python-docs", a file or folder path, or "hf:<id>[:<config>]"
    context_length: int = 128  # tokens per block, including the leading start token
    heldout_fraction: float = 0.05  # fraction of documents held out, chosen by a hash of the doc id
    max_train_tokens: int | None = None  # cap on the train stream (None = all)
    max_heldout_tokens: int | None = 200_000  # cap on the held-out stream (None = all)
    file_suffixes: list[str] = [".txt", ".rst", ".md"]
    hf_split: str = "train"
    hf_text_field: str = "text"
    seed: int = 0  # salts the document-split hash

    @pydantic.field_validator("context_length")
    @classmethod
    def _context_length_at_least_two(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"context_length must be >= 2 (start token + 1 text token), got {value}")
        return value

    @pydantic.field_validator("heldout_fraction")
    @classmethod
    def _fraction_open_unit_interval(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {value}")
        return value

    @pydantic.field_validator("max_train_tokens", "max_heldout_tokens")
    @classmethod
    def _cap_positive(cls, value: int | None, info: pydantic.ValidationInfo) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"{info.field_name} must be positive or None (no cap), got {value}")
        return value

    @pydantic.field_validator("file_suffixes")
    @classmethod
    def _suffixes_nonempty(cls, value: list[str]) -> list[str]:
        if not value or any(not s for s in value):
            raise ValueError(f"file_suffixes must be a non-empty list of non-empty suffixes, got {value}")
        return value

    @pydantic.model_validator(mode="after")
    def _hf_source_needs_caps(self) -> DataConfig:
        if self.source.startswith("hf:"):
            parse_hf_source(self.source)
            if self.max_train_tokens is None or self.max_heldout_tokens is None:
                raise ValueError(
                    "max_train_tokens and max_heldout_tokens must both be set for an hf: source "
                    "(it is streamed and may be unbounded)"
                )
        return self


@dataclass
class TokenBlocks:
    """Train and held-out blocks; column 0 of every block is ``start_token_id``."""

    train: torch.Tensor  # [n_train_blocks, context_length] int64
    heldout: torch.Tensor  # [n_heldout_blocks, context_length] int64
    start_token_id: int


def is_heldout(doc_id: str, heldout_fraction: float, seed: int) -> bool:
    """Whether a document is held out: a stable hash of (seed, doc_id), independent of position."""
    digest = hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """(start id, separator id): bos and eos; either stands in for the other when it is None."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None and eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a bos nor an eos token")
    return (eos if bos is None else bos), (bos if eos is None else eos)


def _tokenize_streams(
    source: TextSource, tokenizer: PreTrainedTokenizerBase, config: DataConfig, separator: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents into the train and held-out streams until both caps are met."""
    caps = (config.max_train_tokens, config.max_heldout_tokens)
    streams: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    counts = [0, 0]

    def full(split: int) -> bool:
        return caps[split] is not None and counts[split] >= caps[split]

    batch: list[tuple[str, str]] = []

    def flush() -> None:
        if not batch:
            return
        encoded = tokenizer([text for _, text in batch], add_special_tokens=False, verbose=False)
        for (doc_id, _), ids in zip(batch, encoded["input_ids"]):
            split = int(is_heldout(doc_id, config.heldout_fraction, config.seed))
            if full(split) or not ids:  # empty documents add nothing, not even a separator
                continue
            if streams[split]:
                streams[split].append(np.array([separator], dtype=np.uint32))
                counts[split] += 1
            streams[split].append(np.asarray(ids, dtype=np.uint32))
            counts[split] += len(ids)
        batch.clear()

    for doc_id, text in source.documents():
        batch.append((doc_id, text))
        if len(batch) == _TOKENIZE_BATCH_DOCS:
            flush()
            if full(0) and full(1):
                break
    flush()
    train, heldout = (
        np.concatenate(parts or [np.zeros(0, np.uint32)])[:cap] for parts, cap in zip(streams, caps)
    )
    return train, heldout


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Name, vocab size and (for fast tokenizers) a hash of the full tokenizer definition."""
    identity = {"name_or_path": str(tokenizer.name_or_path), "vocab_size": len(tokenizer)}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        identity["definition_sha256"] = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return identity


def _cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_ATTN_CACHE", DEFAULT_CACHE_DIR)).expanduser() / "tokens"


def _read_cache(npy: Path, meta_path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """Cached (train, heldout) streams, or None if absent; a damaged cache is reported and ignored."""
    if not (npy.exists() and meta_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        ids = np.load(npy, allow_pickle=False)
        n_train, n_heldout = int(meta["n_train"]), int(meta["n_heldout"])
        if ids.ndim != 1 or ids.dtype != np.uint32 or ids.size != n_train + n_heldout:
            raise ValueError(f"array {ids.dtype}{list(ids.shape)} does not hold {n_train}+{n_heldout} ids")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        warnings.warn(f"token cache {npy} is damaged ({err}); rebuilding it", stacklevel=3)
        return None
    return ids[:n_train], ids[n_train:]


def _write_cache(npy: Path, meta_path: Path, train: np.ndarray, heldout: np.ndarray, meta: dict) -> None:
    """Write ids then metadata, each to a temporary file moved into place, so readers never see half."""
    npy.parent.mkdir(parents=True, exist_ok=True)
    ids = np.concatenate([train, heldout])

    def save_ids(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save given a path would append ".npy" to the temporary name
            np.save(f, ids)

    write_atomic(npy, save_ids)
    write_json_atomic(meta_path, {**meta, "n_train": len(train), "n_heldout": len(heldout)}, indent=1)


def _cut_blocks(stream: np.ndarray, context_length: int, start_token_id: int, split: str) -> torch.Tensor:
    """[n_blocks, context_length] int64: chunks of context_length-1 tokens after a start token."""
    body = context_length - 1
    if len(stream) < body:
        raise ValueError(
            f"the {split} split has {len(stream)} tokens but one block of context_length {context_length} "
            f"needs {body}; add text, raise the token caps, or change data.heldout_fraction"
        )
    n_blocks = len(stream) // body
    tokens = torch.from_numpy(stream[: n_blocks * body].astype(np.int64)).view(n_blocks, body)
    return torch.cat([torch.full((n_blocks, 1), start_token_id, dtype=torch.int64), tokens], dim=1)


def load_token_blocks(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, context_length: int | None = None
) -> TokenBlocks:
    """Train and held-out blocks for ``config``; ``context_length`` overrides the config's if given.

    The start token is the tokenizer's bos (eos if it has no bos); documents are separated by eos
    (bos if it has no eos). Token ids are cached; a damaged cache is rebuilt with a warning.
    """
    context_length = config.context_length if context_length is None else context_length
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2, got {context_length}")
    start_token_id, separator = special_token_ids(tokenizer)
    source = open_source(config.source, config.file_suffixes, config.hf_split, config.hf_text_field)
    meta = {
        "source": config.source,
        "identity": source.identity,
        "tokenizer": _tokenizer_identity(tokenizer),
        "cleaning_version": CLEANING_VERSION,
        "separator": separator,
        "split": [config.heldout_fraction, config.seed, config.max_train_tokens, config.max_heldout_tokens],
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    npy, meta_path = _cache_dir() / f"{key}.npy", _cache_dir() / f"{key}.json"
    cached = _read_cache(npy, meta_path)
    if cached is None:
        started = time.perf_counter()
        train, heldout = _tokenize_streams(source, tokenizer, config, separator)
        logger.info(
            "tokenized %s: %d train + %d held-out tokens in %.1fs",
            config.source,
            len(train),
            len(heldout),
            time.perf_counter() - started,
        )
        _write_cache(npy, meta_path, train, heldout, meta)
    else:
        train, heldout = cached
    return TokenBlocks(
        train=_cut_blocks(train, context_length, start_token_id, "train"),
        heldout=_cut_blocks(heldout, context_length, start_token_id, "held-out"),
        start_token_id=start_token_id,
    )


def _check_batching(blocks: torch.Tensor, batch_size: int) -> None:
    if blocks.ndim != 2 or len(blocks) == 0:
        raise ValueError(
            f"blocks must be a non-empty [n_blocks, context_length] tensor, got {list(blocks.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def batch_iterator(
    blocks: torch.Tensor, batch_size: int, seed: int, start_batch: int = 0
) -> Iterator[torch.Tensor]:
    """Endless [batch_size, context_length] batches, reshuffled each epoch by a generator seeded by (seed, epoch).

    Each epoch yields ``len(blocks) // batch_size`` full batches (leftover blocks wait for a later
    shuffle). Batch ``start_batch`` onwards equals a fresh iterator's, computed without producing
    the skipped batches, so training resumes exactly after a kill.
    """
    _check_batching(blocks, batch_size)
    if batch_size > len(blocks):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(blocks)} available blocks")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    per_epoch = len(blocks) // batch_size
    epoch, offset = divmod(start_batch, per_epoch)
    while True:
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> 1)
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(epoch_seed))
        for index in range(offset, per_epoch):
            yield blocks[order[index * batch_size : (index + 1) * batch_size]]
        epoch, offset = epoch + 1, 0


def iterate_blocks(blocks: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """One ordered pass over ``blocks`` in batches (for evaluation); the last partial batch is kept."""
    _check_batching(blocks, batch_size)
    for begin in range(0, len(blocks), batch_size):
        yield blocks[begin : begin + batch_size]


class TrainDataConfig(DataConfig, extra="forbid"):
    """The sparsify stage's data: `DataConfig` plus the sources and lengths its training batches mix.

    `source` stays the corpus the stage calibrates and reports at `context_length`; with `mix`, training
    batches come from each named source in proportion to its weight (each source's train split only).
    With `long_context_length`, every `long_every`-th optimiser step trains on blocks of that length (a list:
    the long steps take its lengths in turn), in batches of `max(1, batch_size * context_length // length)`
    (about as many tokens as a short step); the other steps use `context_length`.
    """

    mix: dict[str, float] | None = None  # source -> relative weight of its training batches; None = `source` only
    # tokens per block of the long steps, or several lengths taken in turn (None: every step at context_length)
    long_context_length: int | list[int] | None = None
    long_every: int = 1  # every long_every-th step is long (1 = every step)

    @pydantic.field_validator("mix")
    @classmethod
    def _weights_positive(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None:
            if not value:
                raise ValueError("data.mix is empty: name at least one source, e.g. {python-docs: 1.0}, or leave it unset")
            bad = {name: weight for name, weight in value.items() if not (math.isfinite(weight) and weight > 0)}
            if bad:
                raise ValueError(f"data.mix weights must be positive and finite, got {bad}")
        return value

    @pydantic.field_validator("long_every")
    @classmethod
    def _every_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"long_every must be >= 1 (1 = every step long), got {value}")
        return value

    @pydantic.model_validator(mode="after")
    def _mix_and_lengths_consistent(self) -> TrainDataConfig:
        if self.mix is not None:
            if self.source not in self.mix:
                raise ValueError(f"data.source {self.source!r} must be one of data.mix's sources {list(self.mix)}: "
                                 "it is the corpus the stage calibrates and reports on")
            for name in self.mix:
                if name.startswith("hf:"):
                    parse_hf_source(name)
                    if self.max_train_tokens is None or self.max_heldout_tokens is None:
                        raise ValueError(f"data.mix source {name!r} is streamed: set max_train_tokens and "
                                         "max_heldout_tokens")
        if self.long_context_length is None:
            if self.long_every != 1:
                raise ValueError(f"data.long_every is {self.long_every} but data.long_context_length is unset; "
                                 "give the long steps' length or drop long_every")
        else:
            lengths = self.long_lengths()
            if not lengths:
                raise ValueError("data.long_context_length is an empty list: give one length or more, or leave it unset")
            if any(length < 2 or length == self.context_length for length in lengths):
                raise ValueError(f"data.long_context_length must be >= 2 and differ from data.context_length "
                                 f"{self.context_length}, got {self.long_context_length}; leave it unset for one length")
            if len(set(lengths)) != len(lengths):
                raise ValueError(f"data.long_context_length lists a length twice: {self.long_context_length}")
        return self

    def long_lengths(self) -> list[int]:
        """The long steps' lengths in the order they take turns ([] without long steps)."""
        if self.long_context_length is None:
            return []
        return [self.long_context_length] if isinstance(self.long_context_length, int) else list(self.long_context_length)

    def weights(self) -> dict[str, float]:
        """Each training source's share of the batches, summing to 1 (in `mix` order; `source` alone without mix)."""
        mix = self.mix or {self.source: 1.0}
        total = sum(mix.values())
        return {name: weight / total for name, weight in mix.items()}

    def step_length(self, step: int) -> int:
        """The block length optimiser step `step` (from 0) trains on."""
        lengths = self.long_lengths()
        if lengths and (step + 1) % self.long_every == 0:
            return lengths[((step + 1) // self.long_every - 1) % len(lengths)]
        return self.context_length

    def batch_size_at(self, length: int, batch_size: int) -> int:
        """Blocks per batch at `length`: `batch_size` at context_length, as many tokens (at least 1) otherwise."""
        return batch_size if length == self.context_length else max(1, batch_size * self.context_length // length)


@dataclass
class TrainingData:
    """The train-split blocks of every (source, length) the training mixes, and how batches are drawn from them."""

    config: TrainDataConfig
    blocks: dict[tuple[str, int], torch.Tensor]  # (source, length) -> [n_blocks, length] int64
    batch_size: int  # blocks per batch at config.context_length
    seed: int

    def stream_seed(self, source: str, length: int) -> int:
        """The shuffling seed of one (source, length): `seed` itself for (data.source, context_length), so a run
        without mix or long steps draws the batches `batch_iterator(train, batch_size, seed)` draws."""
        if (source, length) == (self.config.source, self.config.context_length):
            return self.seed
        digest = hashlib.sha256(f"{self.seed}\0{source}\0{length}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1


def load_training_data(config: TrainDataConfig, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                       seed: int) -> TrainingData:
    """The train split of each mixed source at each training length; too few blocks for one batch is an error here."""
    lengths = [config.context_length] + config.long_lengths()
    blocks = {}
    for source in config.weights():
        for length in lengths:
            train = load_token_blocks(config.model_copy(update={"source": source}), tokenizer, length).train
            needed = config.batch_size_at(length, batch_size)
            if len(train) < needed:
                raise ValueError(f"the train split of {source!r} has {len(train)} blocks of {length} tokens but a "
                                 f"batch needs {needed}; add text, raise data.max_train_tokens or lower the batch size")
            blocks[(source, length)] = train
    return TrainingData(config, blocks, batch_size, seed)


def _weighted_round_robin(weights: dict[str, float], counts: dict[str, int]) -> str:
    """The source whose count lags its share most (first in order on ties); after n picks each source has
    been picked within one of n x its weight."""
    total = sum(counts.values()) + 1
    return max(weights, key=lambda name: weights[name] * total - counts[name])


def stream_name(stream: tuple[str, int]) -> str:
    """('brown', 512) -> 'brown@512': how histories, multipliers and benches name a training stream."""
    return f"{stream[0]}@{stream[1]}"


def draw_schedule(config: TrainDataConfig, draws_per_step: int = 1) -> Iterator[tuple[str, int]]:
    """Endless (source, length) of each training draw: draw d belongs to step d // draws_per_step, whose length is
    `config.step_length(step)`; among the draws of one length the sources take turns by weighted round robin."""
    if draws_per_step < 1:
        raise ValueError(f"draws_per_step must be >= 1, got {draws_per_step}")
    weights = config.weights()
    picked: dict[int, dict[str, int]] = {}  # draws so far per length and source
    draw = 0
    while True:
        length = config.step_length(draw // draws_per_step)
        counts = picked.setdefault(length, dict.fromkeys(weights, 0))
        source = _weighted_round_robin(weights, counts)
        counts[source] += 1
        yield source, length
        draw += 1


def mixed_batches(data: TrainingData, draws_per_step: int = 1, start_draw: int = 0) -> Iterator[torch.Tensor]:
    """Endless training batches in `draw_schedule` order, each (source, length) yielding the batches of its own
    `batch_iterator`.

    Draw `start_draw` onwards equals a fresh iterator's (the skipped draws are counted, not produced), so
    training resumes exactly after a kill.
    """
    if start_draw < 0:
        raise ValueError(f"start_draw must be >= 0, got {start_draw}")
    config = data.config
    schedule = draw_schedule(config, draws_per_step)
    skipped = {key: 0 for key in data.blocks}
    for _ in range(start_draw):
        skipped[next(schedule)] += 1
    streams = {(source, length): batch_iterator(blocks, config.batch_size_at(length, data.batch_size),
                                                data.stream_seed(source, length), start_batch=skipped[(source, length)])
               for (source, length), blocks in data.blocks.items()}
    for key in schedule:
        yield next(streams[key])
