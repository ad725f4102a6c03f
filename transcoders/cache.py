"""Optional on-disk activation cache, so several CLT runs can reuse one harvest.

Layout: `shard_{k:05d}.npy`, each [tokens, 2, L, D] float16 (mlp_in, mlp_out), and `manifest.json`
(model identity, shape, shards written, token blocks read). Every file is written to a temporary
name and renamed into place, the manifest after its shard, so a killed build resumes after the last
complete shard. Shards are read memory-mapped. At ~69 KB per token for SmolLM2 a full cache is
large, which is why the default is to train straight from the in-memory shuffle buffer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from runtime.files import write_atomic, write_json_atomic
from sparse_attention.data import batch_iterator
from transcoders.harvest import Chunk, harvest_batch

MANIFEST = "manifest.json"
CACHE_VERSION = 1
FP16_MAX = float(np.finfo(np.float16).max)


class CacheError(ValueError):
    """An activation cache that cannot be used or written; the message says why and what to do."""


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest["version"] != CACHE_VERSION:
            raise ValueError(f"version {manifest['version']}, this code reads {CACHE_VERSION}")
        return manifest
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{path} is corrupted ({exc}); delete the cache directory to rebuild it") from exc


def _write_shard(path: Path, mlp_in: torch.Tensor, mlp_out: torch.Tensor) -> None:
    peak = max(mlp_in.abs().max().item(), mlp_out.abs().max().item())
    if not peak < FP16_MAX:
        raise CacheError(f"activations reach {peak:.3g}, beyond float16's range; train without cache.enabled")
    array = torch.stack([mlp_in, mlp_out], dim=1).to(torch.float16).numpy()  # [n, 2, L, D]

    def save_array(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # np.save given a path would append ".npy" to the temporary name
            np.save(f, array)

    write_atomic(path, save_array)


def build_cache(model: nn.Module, blocks: torch.Tensor, directory: str | Path, *, identity: dict, batch_size: int,
                seed: int, max_tokens: int, shard_tokens: int, progress: bool = True) -> dict:
    """Harvest `max_tokens` tokens of activations into `directory` (resuming a partial build); returns the manifest.

    `identity` names the model and data; a cache built for another identity is refused, not mixed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(directory)
    if manifest is None:
        manifest = {"version": CACHE_VERSION, "identity": identity, "max_tokens": max_tokens, "shards": [],
                    "tokens": 0, "batches_read": 0, "complete": False}
    elif manifest["identity"] != identity or manifest["max_tokens"] != max_tokens:
        raise CacheError(
            f"the activation cache in {directory} was built for another model, data or size; "
            "delete it or set cache.directory to a new folder"
        )
    if manifest["complete"]:
        return manifest
    bar = tqdm(total=max_tokens, initial=manifest["tokens"], desc="harvest", disable=not progress, unit="tok")
    batches = batch_iterator(blocks, batch_size, seed, start_batch=manifest["batches_read"])
    while manifest["tokens"] < max_tokens:
        want = min(shard_tokens, max_tokens - manifest["tokens"])
        parts, have = [], 0
        while have < want:
            parts.append(harvest_batch(model, next(batches)))
            manifest["batches_read"] += 1
            have += len(parts[-1][0])
        mlp_in = torch.cat([x for x, _ in parts])[:want]
        mlp_out = torch.cat([y for _, y in parts])[:want]
        name = f"shard_{len(manifest['shards']):05d}.npy"
        _write_shard(directory / name, mlp_in, mlp_out)
        manifest["shards"].append({"file": name, "tokens": want})
        manifest["tokens"] += want
        manifest["complete"] = manifest["tokens"] >= max_tokens
        write_json_atomic(directory / MANIFEST, manifest, indent=1)
        bar.update(want)
    bar.close()
    return manifest


def _open_shard(directory: Path, entry: dict, shape: tuple[int, int]) -> np.ndarray:
    path = directory / entry["file"]
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is unreadable ({exc}); delete the cache directory to rebuild it") from exc
    if array.shape != (entry["tokens"], 2, *shape) or array.dtype != np.float16:
        raise CacheError(f"{path} holds {array.dtype}{list(array.shape)}, the manifest promises "
                         f"float16[{entry['tokens']}, 2, {shape[0]}, {shape[1]}]; delete the cache to rebuild it")
    return array


def cache_chunks(directory: str | Path, shape: tuple[int, int], start_chunk: int = 0, chunk_tokens: int = 4096
                 ) -> Iterator[Chunk]:
    """Endless float32 chunks (mlp_in, mlp_out) [<= chunk_tokens, L, D] read in order from a complete
    cache, looping over it; chunk `start_chunk` onwards equals a fresh iterator's."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None or not manifest["complete"]:
        raise CacheError(f"no complete activation cache in {directory}; build it with build_cache first")
    spans = [(entry, begin) for entry in manifest["shards"] for begin in range(0, entry["tokens"], chunk_tokens)]
    index = start_chunk
    while True:
        entry, begin = spans[index % len(spans)]
        array = _open_shard(directory, entry, shape)[begin: begin + chunk_tokens]
        both = torch.from_numpy(np.array(array, dtype=np.float32))  # [n, 2, L, D], read from the memory map
        yield both[:, 0], both[:, 1]
        index += 1
