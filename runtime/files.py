"""Atomic writes: a reader sees a file or directory whole, old or new, never half-written; and the content
key of a set of files (`files_sha256`).

Everything is written under a temporary sibling name and then moved into place with one rename. The
temporary name starts with '.' (directory listings and globs such as `*.safetensors` skip it) and holds
the writer's pid and a random uuid, so concurrent writers of the same target never share a temporary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A fresh name beside `path` that no other writer uses: `.{name}.{pid}-{uuid}.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to write a temporary sibling of `path`, then rename it to `path`.

    A kill mid-write leaves `path` as it was; an exception removes the temporary and propagates.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, payload: dict, *, indent: int = 2) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent))


def write_directory_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` to fill a new temporary sibling directory of `path`, then swap it in for `path`.

    A previous `path` is first renamed aside and deleted (a rename needs a free target). If a concurrent
    writer's complete directory lands at `path` in between, that one stays and this one is dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        write(tmp)
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename directory `tmp` to `path`, first moving aside whatever `path` holds."""
    if path.exists():
        stale = temporary_sibling(path)
        try:
            os.replace(path, stale)
        except FileNotFoundError:
            pass  # another writer moved it first
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, path)
    except OSError:
        if not path.is_dir():  # anything but "a concurrent writer got there first" is a real error
            raise


def files_sha256(directory: str | Path, names: list[str]) -> str:
    """sha256 of the named files of `directory` (each file's name relative to it, its size and its bytes,
    in sorted name order): a content key that stays the same wherever the directory is copied."""
    directory, digest = Path(directory), hashlib.sha256()
    for name in sorted(names):
        path = directory / name
        digest.update(json.dumps([name, path.stat().st_size]).encode())
        with open(path, "rb") as stream:
            while chunk := stream.read(16 * 2**20):
                digest.update(chunk)
    return digest.hexdigest()
