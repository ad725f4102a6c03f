"""Training checkpoints: atomic writes, and loads that refuse foreign state.

A checkpoint holds tensors and plain containers (dict, list, tuple, str, int, float, bool, None) only, and
is read with `torch.load(weights_only=True)`: a file that needs anything else (a pickled object, which
could run code while loading) is refused, never unpickled.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from runtime.files import write_atomic


class CheckpointError(RuntimeError):
    """A training checkpoint that exists but cannot be resumed from."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` atomically: a kill mid-write leaves the previous checkpoint intact."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, fingerprint: str, what: str = "training", *, mmap: bool = False) -> dict | None:
    """The saved state, None if there is none; CheckpointError if unreadable, holding more than tensors and
    plain containers, or written by another config.

    `what` names the trainer in messages ("training", "CLT", "feature scan"); `mmap` maps the tensors
    instead of reading them (see `require_resumable`).
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:  # weights_only refuses anything but tensors and plain containers
        pickled_object = re.search(r"GLOBAL (\S+)", str(exc))
        if pickled_object is not None:
            raise CheckpointError(
                f"{path} holds a pickled object ({pickled_object.group(1)}), not only tensors and plain "
                f"containers; it is not loaded, since unpickling it could run code. Delete it to restart {what} "
                "from scratch"
            ) from exc
        raise CheckpointError(f"{path} is unreadable ({_last_line(exc)}); delete it to restart {what} from scratch"
                              ) from exc
    except Exception as exc:  # torch.load raises many types for truncated or foreign files
        raise CheckpointError(f"{path} is unreadable ({exc}); delete it to restart {what} from scratch") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is unreadable (not a {what} state); delete it to restart {what} from scratch")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written by a different {what} config or model; delete it (or use another output) to restart"
        )
    return state


def require_resumable(path: Path, fingerprint: str, what: str = "training") -> None:
    """Raise load_checkpoint's CheckpointError now if the checkpoint at `path` cannot be resumed: a stage
    calls this before it writes anything into its output directory, so a refused rerun leaves the directory
    (its config file above all) as the run that wrote the checkpoint left it. Maps rather than reads the
    tensors: cheap for a checkpoint of any size."""
    load_checkpoint(path, fingerprint, what, mmap=True)


def _last_line(exc: Exception) -> str:
    """The unpickler's own reason, without the advice torch.load wraps around it."""
    lines = str(exc).split("\n\nCheck the documentation")[0].strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
