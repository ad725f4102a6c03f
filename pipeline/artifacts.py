"""The artifact store: one directory per stage output, keyed by its config and its inputs' keys.

A stage writes into a local work directory (the real directory for a local output, a staging copy
for a remote one such as s3://), then `commit` uploads it and writes `manifest.json` last. A stage
directory without a manifest is unfinished work: rerunning resumes from whatever checkpoints it
holds. A manifest whose key differs from the requested one is never overwritten silently.

The manifest records each output file's size and sha256 (files over FULL_HASH_BYTES: their size and the
sha256 of their first and last EDGE_HASH_BYTES), so a rerun can tell a finished stage whose files were
changed or removed since (`damaged_files`). Locks of running stages live in `lock_dir` (pipeline/locks.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from runtime.files import write_bytes_atomic
from sparse_attention.models import cache_dir

MANIFEST = "manifest.json"
RAY_TRAIN_DIR = "ray_train"  # Ray Train's storage (reported checkpoints) inside a stage's work directory
CHECKPOINT_DIR = "checkpoints"  # a stage's resume state (any depth); not an output, never hashed
LOCK_DIR = ".locks"
FULL_HASH_BYTES = 256 * 2**20  # files up to this size are hashed whole
EDGE_HASH_BYTES = 2**20  # larger ones: size, plus the hash of this many bytes at each end


class ArtifactError(RuntimeError):
    """Stored outputs that cannot be used as asked (foreign key, unreadable manifest, bad location)."""


def artifact_key(stage: str, config_payload: dict, input_keys: dict[str, str]) -> str:
    """Content key of a stage output: its name, its config section and the keys of its inputs."""
    blob = json.dumps({"stage": stage, "config": config_payload, "inputs": input_keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ArtifactStore:
    """Stage outputs under one root: a local path or any pyarrow filesystem URI."""

    def __init__(self, root: str):
        self.root = root
        try:
            self.fs, self.base = pafs.FileSystem.from_uri(root) if "://" in root else (
                pafs.LocalFileSystem(), str(Path(root).resolve()))
        except (OSError, ValueError) as exc:  # pyarrow: ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise ArtifactError(f"cannot open output {root!r}: {exc}") from None
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def check_writable(self) -> None:
        probe = f"{self.base}/.write_probe.{uuid.uuid4().hex}"  # concurrent runs never share it
        try:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"")
            self.fs.delete_file(probe)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"output {self.root} is not writable: {exc}") from None

    def uri(self, stage_dir: str) -> str:
        return f"{self.base}/{stage_dir}"

    def _local_root(self) -> Path:
        """The local directory stages write into: the output itself, or a staging copy for a remote store."""
        if self.is_local:
            return Path(self.base)
        return cache_dir() / "staging" / hashlib.sha256(self.root.encode()).hexdigest()[:12]

    def work_dir(self, stage_dir: str) -> Path:
        """Local directory the stage writes into (staging for remote stores, kept for resume)."""
        path = self._local_root() / stage_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def lock_dir(self) -> Path:
        """Where running stages' locks live: in the output for a local store; a remote store's are local to
        this machine (object stores have no exclusive create), so they only guard runs on this machine."""
        return self._local_root() / LOCK_DIR

    def output_files(self, stage_dir: str, *, skip: list[str] = (), only: tuple[str, ...] = ()) -> list[str]:
        """The files of a finished stage, relative to the root: everything under `stage_dir` except manifests,
        checkpoints, temporaries left by a killed write (`.*.tmp`), the subdirectories `skip` (relative to
        `stage_dir`: other stages' outputs) and, when `only` is given, files matching none of its glob patterns
        (relative to `stage_dir`)."""
        local = self.work_dir(stage_dir)
        files = []
        for path in sorted(local.rglob("*")):
            relative = path.relative_to(local).as_posix()
            parts = relative.split("/")
            temporary = parts[-1].startswith(".") and parts[-1].endswith(".tmp")
            resume_state = {CHECKPOINT_DIR, RAY_TRAIN_DIR} & set(parts[:-1])
            if (not path.is_file() or parts[-1] == MANIFEST or temporary or resume_state
                    or any(relative.startswith(f"{directory}/") for directory in skip)
                    or (only and not any(fnmatch.fnmatch(relative, pattern) for pattern in only))):
                continue
            files.append(f"{stage_dir}/{relative}")
        return files

    def _fingerprint(self, path: str, size: int, filesystem: pafs.FileSystem) -> dict:
        """{"size", "sha256"} of one file; files over FULL_HASH_BYTES hash their two ends only ("ends": true)."""
        digest = hashlib.sha256()
        with filesystem.open_input_file(path) as stream:
            if size <= FULL_HASH_BYTES:
                while chunk := stream.read(16 * 2**20):
                    digest.update(chunk)
                return {"size": size, "sha256": digest.hexdigest()}
            digest.update(stream.read_at(EDGE_HASH_BYTES, 0))
            digest.update(stream.read_at(EDGE_HASH_BYTES, size - EDGE_HASH_BYTES))
        return {"size": size, "sha256": digest.hexdigest(), "ends": True}

    def fingerprints(self, files: list[str]) -> dict[str, dict]:
        """Size and content hash of each of `files` (relative to the root), read from the local work copy."""
        local, filesystem = self._local_root(), pafs.LocalFileSystem()
        return {name: self._fingerprint(str(local / name), (local / name).stat().st_size, filesystem)
                for name in files}

    def damaged_files(self, manifest_dir: str) -> list[str]:
        """Files the stage's manifest lists that are missing or differ from their recorded size or hash
        (read from the store itself), each as "path (missing|size changed|content changed)"."""
        recorded = (self.manifest(manifest_dir) or {}).get("files") or {}
        damaged = []
        for name, expected in recorded.items():
            info = self.fs.get_file_info(f"{self.base}/{name}")
            if info.type != pafs.FileType.File:
                damaged.append(f"{name} (missing)")
            elif info.size != expected["size"]:
                damaged.append(f"{name} (size changed)")
            elif self._fingerprint(info.path, info.size, self.fs) != expected:
                damaged.append(f"{name} (content changed)")
        return damaged

    def manifest(self, stage_dir: str) -> dict | None:
        path = f"{self.uri(stage_dir)}/{MANIFEST}"
        if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(path) as stream:
                return json.loads(stream.read())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path} is unreadable ({exc}); delete it or use --force to recompute") from None

    def is_done(self, stage_dir: str, key: str, *, force: bool = False) -> bool:
        """True if the stage's output exists for this key; error if it exists for another key."""
        manifest = self.manifest(stage_dir)
        if manifest is None:
            return False
        if force:
            self.invalidate(stage_dir)
            return False
        if manifest.get("key") != key:
            raise ArtifactError(
                f"{self.uri(stage_dir)} holds outputs of a different config or inputs (key {manifest.get('key')}, "
                f"asked for {key}); use --force with that stage to recompute, or another --output"
            )
        return True

    def invalidate(self, stage_dir: str) -> None:
        """Remove the manifest so the directory reads as unfinished (outputs are overwritten on rerun)."""
        self.fs.delete_file(f"{self.uri(stage_dir)}/{MANIFEST}")
        local = self.work_dir(stage_dir)
        for checkpoint in [*local.glob(f"**/{CHECKPOINT_DIR}"), *local.glob(f"**/{RAY_TRAIN_DIR}")]:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def commit(self, stage_dir: str, key: str, summary: dict, manifest_dir: str | None = None,
               files: list[str] = ()) -> None:
        """Upload the work directory (remote stores) and write the manifest last (into `manifest_dir`), with the
        size and hash of each of `files` (relative to the root; `output_files` lists them)."""
        local = self.work_dir(stage_dir)
        if not self.is_local:
            self.fs.create_dir(self.uri(stage_dir), recursive=True)
            pafs.copy_files(str(local), self.uri(stage_dir), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        payload = json.dumps({"key": key, "finished_at": time.time(), **summary, "files": self.fingerprints(files)},
                             indent=2, default=str).encode()
        manifest_dir = manifest_dir or stage_dir
        self.fs.create_dir(self.uri(manifest_dir), recursive=True)
        final = f"{self.uri(manifest_dir)}/{MANIFEST}"
        if self.is_local:
            write_bytes_atomic(final, payload)
        else:
            with self.fs.open_output_stream(final) as stream:  # object stores publish whole objects
                stream.write(payload)
