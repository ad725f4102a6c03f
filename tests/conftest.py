"""Fixtures shared by several test modules."""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch

from sparse_attention.models import TinyModelConfig, load_model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids oversubscription stalls on a busy machine (50x here). Modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_LLAMA = TinyModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=0)


@pytest.fixture(scope="module")
def tiny():
    """The 2-layer TINY_LLAMA model (frozen) and its byte tokenizer."""
    model, tokenizer = load_model("tiny", tiny=TINY_LLAMA)
    model.requires_grad_(False)
    return model, tokenizer


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache directory of the test's own (converted models, activation caches)."""
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "cache"))


class IndexedSource:
    """A CLT BatchSource whose batch k is make_batch(k) alone, so a resumed run and every data-parallel rank
    read exactly the same data.  `indexed_source(make_batch)` is the factory train_clt takes."""

    def __init__(self, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], state: dict | None):
        self.make_batch = make_batch
        self.next_batch = (state or {}).get("batch", 0)

    def state(self) -> dict:
        return {"batch": self.next_batch}

    def __iter__(self):
        while True:
            batch = self.make_batch(self.next_batch)
            self.next_batch += 1
            yield batch


def indexed_source(make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]):
    """The train_clt source factory (state -> source) serving make_batch(0), make_batch(1), ..."""
    return partial(IndexedSource, make_batch)
