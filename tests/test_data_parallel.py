"""Data-parallel post-training: two gloo workers on halves of a batch take the same first step as one
worker on the whole batch, and the Ray Train path runs the tiny preset end to end, checkpointing through
Ray Train into the stage's work directory and resuming from there."""

import copy
import json
import shutil

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import load_config
from pipeline.orchestrate import run_pipeline
from sparse_attention.config import TrainConfig
from sparse_attention.constraint import ControllerConfig
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import TinyModelConfig, tiny_model
from sparse_attention.train import post_train

TINY = TinyModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=7)
TRAIN = TrainConfig(steps=1, batch_size=4, lr=1e-2, offset_lr=0.1, warmup_steps=0, gate_noise=False,
                    trainable="all")


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
