"""Data-parallel training (sparsify and CLT): two gloo workers on halves of a batch take the same steps as one
worker on the whole batch, and the Ray Train path runs the tiny preset end to end, checkpointing through
Ray Train into the stage's work directory and resuming from there."""

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.artifacts import RAY_TRAIN_DIR
from pipeline.config import load_config
from pipeline.orchestrate import REPO_ROOT, execute_stage, run_pipeline, stage_keys
from sparse_attention.config import TrainConfig
from sparse_attention.constraint import ControllerConfig
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import TinyModelConfig, tiny_model
from sparse_attention.train import post_train
from tests.conftest import indexed_source
from transcoders.clt import CLTConfig, CrossLayerTranscoder
from transcoders.config import CLTTrainConfig
from transcoders.train import train_clt

TINY = TinyModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=7)
TRAIN = TrainConfig(steps=1, batch_size=4, lr=1e-2, offset_lr=0.1, warmup_steps=0, gate_noise=False,
                    trainable="all", precision="fp32")  # bf16 rounds a half batch differently from a whole one


def one_step() -> dict[str, torch.Tensor]:
    model, _ = tiny_model(TINY)
    reference = copy.deepcopy(model)
    gated = GatedModel(model, offset_init=0.5)
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(11))
    post_train(gated, reference, blocks, TRAIN, ControllerConfig(), learn_offset=True, progress=False)
    return {name: p.detach().clone() for name, p in gated.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        params = one_step()
        if rank == 0:
            torch.save(params, out_file)
    finally:
        dist.destroy_process_group()


def test_two_workers_take_the_single_worker_step(tmp_path):
    single = one_step()
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out_file)), nprocs=2, join=True)
    parallel = torch.load(out_file)
    assert single.keys() == parallel.keys()
    moved = 0
    for name, value in single.items():
        torch.testing.assert_close(parallel[name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(value, one_step_initial()[name]))
    assert moved > 0  # the step changed parameters, so equality is informative


_INITIAL: dict = {}


def one_step_initial() -> dict[str, torch.Tensor]:
    if not _INITIAL:
        model, _ = tiny_model(TINY)
        _INITIAL.update({name: p.detach().clone() for name, p in GatedModel(model, 0.5).named_parameters()})
    return _INITIAL


def test_ray_train_data_parallel_tiny_preset_checkpoints_and_resumes_through_ray_train(tmp_path):
    config = load_config(preset="tiny", overrides=[
        "resources.stages.sparsify.num_workers=2", "resources.stages.sparsify.num_cpus=1",
        "sparsify.train.steps=10", "sparsify.train.checkpoint_every=5", "sparsify.eval.long_blocks=0",
    ])
    results = run_pipeline(config, ["sparsify"], str(tmp_path), progress=False)
    assert results["sparsify"]["skipped"] is False
    stage_dir = tmp_path / "sparsify"
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    assert metrics["train_steps"] == 10 and metrics["edge_fraction"] < 1.0
    assert metrics["train_tokens_seen"] == 10 * config.sparsify.train.batch_size * config.sparsify.data.context_length
    reported = sorted((stage_dir / "ray_train" / "sparsify").glob("checkpoint_*/train_state.pt"))
    assert len(reported) == 2  # steps 5 and 10, kept by Ray Train
    assert {torch.load(p, weights_only=False)["step"] for p in reported} == {5, 10}

    # A run that died after its last checkpoint, whose local training state is lost: only Ray Train's copy
    # can supply it. The rerun must train no step again (history, timings included, comes from the checkpoint).
    for name in ("manifest.json", "metrics.json"):
        (stage_dir / name).unlink()
    shutil.rmtree(stage_dir / "checkpoints")
    shutil.rmtree(stage_dir / "model")
    run_pipeline(config, ["sparsify"], str(tmp_path), progress=False)
    resumed = json.loads((stage_dir / "metrics.json").read_text())
    assert resumed["history"] == metrics["history"]
    assert (stage_dir / "checkpoints" / "train_state.pt").exists() and (stage_dir / "model").is_dir()
    assert resumed["sparse_ce"] == metrics["sparse_ce"]


CLT_SHAPE = CLTConfig(n_layers=3, d_model=8, n_features=16, threshold_init=0.1)
CLT_TRAIN = CLTTrainConfig(steps=2, batch_tokens=64, lr=1e-2, warmup_steps=0, sparsity_coefficient=0.5,
                           sparsity_ramp_fraction=0.01, preact_coefficient=0.1, normalisation_batches=2,
                           init_firing_fraction=0.03, dead_window_tokens=64, checkpoint_every=1)


def seeded_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `index` ([64, L, D] mlp_in, mlp_out), a function of the index alone: every rank reads the same."""
    g = torch.Generator().manual_seed(100 + index)
    x = torch.randn(CLT_TRAIN.batch_tokens, 3, 8, generator=g)
    return x, torch.tanh(x) @ torch.randn(8, 8, generator=g) + 0.1


def clt_steps(checkpoint_dir=None) -> tuple[dict, list[dict], list]:
    """(parameters, history, on_checkpoint calls) after CLT_TRAIN's steps on seeded_batch data."""
    clt = CrossLayerTranscoder(CLT_SHAPE, seed=3)
    calls = []
    result = train_clt(clt, indexed_source(seeded_batch), CLT_TRAIN, checkpoint_dir=checkpoint_dir, progress=False,
                       on_checkpoint=lambda row, directory: calls.append((row["step"], directory)))
    return {name: p.detach().clone() for name, p in clt.named_parameters()}, result.history, calls


def _clt_worker(rank: int, world: int, init_file: str, checkpoint_dir: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(clt_steps(Path(checkpoint_dir)), f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_clt_workers_take_the_single_worker_steps(tmp_path):
    single, history, _ = clt_steps()
    initial = dict(CrossLayerTranscoder(CLT_SHAPE, seed=3).named_parameters())
    out_file = tmp_path / "clt"
    mp.spawn(_clt_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ckpt"), str(out_file)), nprocs=2,
             join=True)
    ranks = [torch.load(f"{out_file}.{rank}", weights_only=False) for rank in range(2)]
    for params, _, _ in ranks:
        assert params.keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.equal(value, initial[name]), name  # every tensor moved: equality is informative
    for (_, rank_history, _) in ranks:  # statistics of the global batch on every rank (nmse: mean of shards)
        for got, want in zip(rank_history, history, strict=True):
            assert got["tokens"] == want["tokens"] and got["dead_fraction"] == want["dead_fraction"]
            for key in ("loss", "mse", "l0", "sparsity", "preact"):
                assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert history[-1]["lambda_s"] > 0 and history[-1]["sparsity"] > 0  # the sparsity term was trained too
    assert 0 < history[-1]["dead_fraction"] < 1  # silent features merged across ranks agree with one process
    assert ranks[0][2] == [(1, tmp_path / "ckpt"), (2, tmp_path / "ckpt")]  # rank 0 saved and hands it over
    assert ranks[1][2] == [(1, None), (2, None)]
    assert torch.load(tmp_path / "ckpt" / "clt_train_state.pt", weights_only=False)["step"] == 2


@pytest.fixture
def ray_session():
    """Embedded Ray with 2 CPUs whose workers import this checkout, as run_pipeline starts it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})
    yield
    ray.shutdown()


def run_clt_dense(config, root: Path) -> dict:
    """The clt_dense stage as the pipeline runs it (manifest, skip, resume), here in the driver."""
    return execute_stage("clt_dense", config.model_dump(mode="json"), str(root), stage_keys(config), False, False)


def stage_files(stage_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(stage_dir)) for p in stage_dir.rglob("*")
                  if p.is_file() and RAY_TRAIN_DIR not in p.relative_to(stage_dir).parts)


def test_ray_train_data_parallel_clt_checkpoints_and_resumes_through_ray_train(tmp_path, ray_session):
    overrides = ["clt.train.steps=20", "clt.train.checkpoint_every=10",
                 "clt.precision=fp32"]  # bf16 rounds a half batch differently from a whole one
    single = load_config(preset="tiny", overrides=overrides)
    parallel = load_config(preset="tiny", overrides=[*overrides, "resources.stages.clt.num_workers=2",
                                                     "resources.stages.clt.num_cpus=1"])
    one_worker = run_clt_dense(single, tmp_path / "one")
    two_workers = run_clt_dense(parallel, tmp_path / "two")
    assert two_workers["skipped"] is False
    assert two_workers["summary"].keys() == one_worker["summary"].keys()  # read back from rank 0's metrics.json
    stage_dir = tmp_path / "two" / "clt" / "dense"
    assert stage_files(stage_dir) == stage_files(tmp_path / "one" / "clt" / "dense")
    metrics = json.loads((stage_dir / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "clt" / "dense" / "metrics.json").read_text())
    assert metrics["train_steps"] == 20 and metrics["train_tokens_seen"] == one["train_tokens_seen"] == 20 * 256
    for got, want in zip(metrics["history"], one["history"], strict=True):  # the one-worker steps, up to rounding
        assert got["tokens"] == want["tokens"]
        for key in ("loss", "mse", "l0", "sparsity"):
            assert got[key] == pytest.approx(want[key], rel=1e-4), (got["step"], key)
    reported = sorted((stage_dir / RAY_TRAIN_DIR / "clt").glob("checkpoint_*/clt_train_state.pt"))
    assert len(reported) == 2  # steps 10 and 20, kept by Ray Train
    assert {torch.load(p, weights_only=False)["step"] for p in reported} == {10, 20}
    assert not (stage_dir / "checkpoints").exists()  # train.keep_checkpoint=False: only Ray Train keeps them

    # A run that died after its last checkpoint, its local outputs lost: only Ray Train's copy can supply the
    # training state. The rerun must train no step again (history, timings included, comes from the checkpoint).
    for path in stage_dir.iterdir():
        if path.name != RAY_TRAIN_DIR:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_clt_dense(parallel, tmp_path / "two")
    resumed = json.loads((stage_dir / "metrics.json").read_text())
    assert resumed["history"] == metrics["history"]
    assert resumed["nmse_per_layer"] == metrics["nmse_per_layer"]
    assert stage_files(stage_dir) == stage_files(tmp_path / "one" / "clt" / "dense")
