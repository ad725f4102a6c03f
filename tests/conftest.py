"""Fixtures shared by several test modules."""

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
