"""Fixtures shared by several test modules, and the suite's layout on pytest-xdist workers."""

import os
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


if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: each uses one torch thread, and so do the processes it starts
    # (pipeline runs, Ray workers), so two workers do not oversubscribe two cores.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# Tests that start embedded Ray, a Ray head or Chromium: they run one at a time, on one worker, so no two
# Ray instances compete for ports (a local Ray's dashboard agent always takes port 52365) or for the cores.
SERVICE_TESTS = (
    "tests/test_batch_attribution.py::",  # the whole module: both tests share one output root
    "tests/test_data_parallel.py::test_ray_train_data_parallel_tiny_preset_checkpoints_and_resumes_through_ray_train",
    "tests/test_data_parallel.py::test_ray_train_data_parallel_clt_checkpoints_and_resumes_through_ray_train",
    "tests/test_pipeline.py::test_tiny_preset_with_embedded_ray",
    "tests/test_pipeline.py::test_ctrl_c_stops_embedded_ray_stages_and_says_how_to_resume",
    "tests/test_pipeline.py::test_ray_job_submit_on_a_local_head",
    "tests/test_pipeline_guards.py::test_stage_exception_is_one_error_line[ray]",
)
SERVICES = "services"


def xdist_work_unit(nodeid: str) -> str:
    """The xdist work unit of a test: SERVICES for the tests above, otherwise its module (so a module's
    module-scoped fixtures are built once)."""
    return SERVICES if nodeid.startswith(SERVICE_TESTS) else nodeid.split("::")[0]


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup` schedules by xdist_work_unit, SERVICES first (its tests are the longest). xdist's own
    loadgroup reads `xdist_group` marks through a node id suffix that pytest 9.2 no longer lets it write."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_work_unit(nodeid)

        def _assign_work_unit(self, node) -> None:
            if SERVICES in self.workqueue:
                self.workqueue.move_to_end(SERVICES, last=False)
            super()._assign_work_unit(node)

    return GroupScheduling(config, log)


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
