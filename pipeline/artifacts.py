"""The artifact store: one directory per stage output, keyed by its config and its inputs' keys.

A stage writes into a local work directory (the real directory for a local output, a staging copy
for a remote one such as s3://), then `commit` uploads it and writes `manifest.json` last. A stage
directory without a manifest is unfinished work: rerunning resumes from whatever checkpoints it
holds. A manifest whose key differs from the requested one is never overwritten silently.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pyarrow.fs as pafs

from runtime.files import write_bytes_atomic
from sparse_attention.models import cache_dir

MANIFEST = "manifest.json"
RAY_TRAIN_DIR = "ray_train"  # Ray Train's storage (reported checkpoints) inside a stage's work directory


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
        probe = f"{self.base}/.write_probe"
        try:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(probe) as stream:
                stream.write(b"")
            self.fs.delete_file(probe)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"output {self.root} is not writable: {exc}") from None

    def uri(self, stage_dir: str) -> str:
        return f"{self.base}/{stage_dir}"

    def work_dir(self, stage_dir: str) -> Path:
        """Local directory the stage writes into (staging for remote stores, kept for resume)."""
        if self.is_local:
            path = Path(self.base) / stage_dir
        else:
            digest = hashlib.sha256(self.root.encode()).hexdigest()[:12]
            path = cache_dir() / "staging" / digest / stage_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

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
        for checkpoint in [*local.glob("**/checkpoints"), *local.glob(f"**/{RAY_TRAIN_DIR}")]:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def commit(self, stage_dir: str, key: str, summary: dict, manifest_dir: str | None = None) -> None:
        """Upload the work directory (remote stores) and write the manifest last (into `manifest_dir`)."""
        local = self.work_dir(stage_dir)
        if not self.is_local:
            self.fs.create_dir(self.uri(stage_dir), recursive=True)
            pafs.copy_files(str(local), self.uri(stage_dir), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        payload = json.dumps({"key": key, "finished_at": time.time(), **summary}, indent=2, default=str).encode()
        manifest_dir = manifest_dir or stage_dir
        self.fs.create_dir(self.uri(manifest_dir), recursive=True)
        final = f"{self.uri(manifest_dir)}/{MANIFEST}"
        if self.is_local:
            write_bytes_atomic(final, payload)
        else:
            with self.fs.open_output_stream(final) as stream:  # object stores publish whole objects
                stream.write(payload)
