"""Training checkpoints shared by every trainer: atomic writes, and loads that refuse foreign state."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointError(RuntimeError):
    """A training checkpoint that exists but cannot be resumed from."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write `state` next to `path`, then rename: a kill mid-write leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, fingerprint: str, what: str = "training") -> dict | None:
    """The saved state, None if there is none; CheckpointError if unreadable or written by another config.

    `what` names the trainer in messages ("training", "CLT training").
    """
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"not a {what} state")
    except Exception as exc:  # torch.load raises many types for truncated or foreign files
        raise CheckpointError(f"{path} is unreadable ({exc}); delete it to restart {what} from scratch") from exc
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written by a different {what} config or model; delete it (or use another output) to restart"
        )
    return state
