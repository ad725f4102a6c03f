"""The shared runtime: checkpoints refuse pickled objects, atomic writes leave the old version or the new one."""

from pathlib import Path

import pytest
import torch

from runtime.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from runtime.files import write_atomic, write_directory_atomic, write_text_atomic


def _spring(marker: str) -> str:
    """What unpickling a `Trap` calls: leaves `marker` behind as proof that code ran."""
    Path(marker).write_text("ran")
    return "sprung"


class Trap:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _spring, (str(self.marker),)


def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(tmp_path: Path):
    path, marker = tmp_path / "train_state.pt", tmp_path / "marker"
    torch.save({"fingerprint": "f", "step": 1, "payload": Trap(marker)}, path)
    with pytest.raises(CheckpointError, match=r"holds a pickled object \(tests\.test_runtime\._spring\).*"
                                              r"Delete it to restart training from scratch"):
        load_checkpoint(path, "f")
    assert not marker.exists()
    assert torch.load(path, weights_only=False)["payload"] == "sprung"  # the trap is live: a plain load runs it
    assert marker.read_text() == "ran"


def test_checkpoint_round_trip_of_tensors_and_plain_containers(tmp_path: Path):
    path = tmp_path / "state.pt"
    state = {"fingerprint": "f", "step": 3, "rng": torch.get_rng_state(), "history": [{"loss": 0.5, "tokens": 8}],
             "weights": {"w": torch.arange(6.0).view(2, 3)}, "source": {"chunks_read": 2}, "smoothed": None}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path, "f")
    assert loaded.keys() == state.keys() and loaded["history"] == state["history"]
    assert torch.equal(loaded["rng"], state["rng"]) and torch.equal(loaded["weights"]["w"], state["weights"]["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path):
    path = tmp_path / "metrics.json"
    write_text_atomic(path, "old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_text("ne")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_crash)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_directory_is_replaced_whole(tmp_path: Path):
    target = tmp_path / "model"
    write_directory_atomic(target, lambda d: (d / "a.txt").write_text("first"))
    write_directory_atomic(target, lambda d: (d / "b.txt").write_text("second"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [(p.name, p.read_text()) for p in target.iterdir()] == [("b.txt", "second")]
