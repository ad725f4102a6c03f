"""Harvesting, the MLP-replacement forward, the activation cache and the whole CLT stage on tiny models
(dense, and gated sparse from a saved checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from runtime.checkpoint import CheckpointError
from sparse_attention.config import ModelSpec
from sparse_attention.data import batch_iterator
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import load_model
from tests.conftest import TINY_LLAMA
from transcoders import cache as cache_module
from transcoders.cache import CacheError, build_cache, cache_chunks
from transcoders.clt import CLTConfig, CrossLayerTranscoder, load_clt
from transcoders.evaluate import MLPReplacement
from transcoders.features import open_features
from transcoders.harvest import MLPRecorder, harvest_batch, lm_logits
from transcoders.memory import CLTMemoryError
from transcoders.stage import CLTStageConfig, build_features, run

torch.set_num_threads(1)
TINY = TINY_LLAMA  # the `tiny` fixture's model (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("private_cache")


def tokens(batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 256  # start token
    return ids


def test_harvest_records_normalised_mlp_input_and_output_without_position_0(tiny):
    model, _ = tiny
    ids = tokens()
    mlp_in, mlp_out = harvest_batch(model, ids)
    assert mlp_in.shape == mlp_out.shape == (2 * 8, 2, 32)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # residual before each layer (+ final)
    for layer, block in enumerate(model.model.layers):
        x, y = mlp_in[:, layer], mlp_out[:, layer]
        torch.testing.assert_close(block.mlp(x), y, rtol=0, atol=1e-6)
        if layer + 1 < len(model.model.layers):  # the last hidden state is after the final norm
            resid_mid = hidden[layer + 1][:, 1:].flatten(0, 1) - y  # residual before the MLP
            torch.testing.assert_close(block.post_attention_layernorm(resid_mid), x, rtol=0, atol=1e-5)


def test_harvest_from_a_gated_model_in_dense_mode_equals_the_plain_model(tiny):
    model, _ = tiny
    plain = harvest_batch(model, tokens())
    gated = GatedModel(load_model("tiny", tiny=TINY)[0], offset_init=0.0).set_mode("dense")
    for a, b in zip(plain, harvest_batch(gated, tokens())):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    sparse = harvest_batch(gated.set_mode("eval"), tokens())  # offset 0 closes some edges: activations change
    assert not torch.allclose(plain[1], sparse[1], atol=1e-4)


def test_clt_replacement_uses_the_replaced_forward_and_keeps_position_0(tiny):
    model, _ = tiny
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=32, n_features=64, threshold_init=0.0), seed=3)
    with torch.no_grad():
        for weight in clt.W_dec:
            weight.mul_(20)  # make the replacement change later layers' inputs visibly
    ids = tokens()
    clean = MLPRecorder(model)
    with clean:
        model(input_ids=ids)
    seen = MLPRecorder(model)
    with MLPReplacement(model, clt, "clt"), seen:  # recorder hooks run after the replacement hooks
        model(input_ids=ids)
    # layer 0 reads the clean input; layer 1 reads the input of the replaced forward, which differs
    torch.testing.assert_close(seen.inputs[0], clean.inputs[0], rtol=0, atol=0)
    assert not torch.allclose(seen.inputs[1][:, 1:], clean.inputs[1][:, 1:], atol=1e-3)
    expected = clt(torch.stack(seen.inputs, dim=2))  # [batch, pos, L, D] from the replaced inputs
    for layer in range(2):
        torch.testing.assert_close(seen.outputs[layer][:, 1:], expected[:, 1:, layer], rtol=0, atol=1e-5)
        torch.testing.assert_close(seen.outputs[layer][:, 0], clean.outputs[layer][:, 0], rtol=0, atol=1e-6)
    zeroed = MLPRecorder(model)
    with MLPReplacement(model, None, "zero"), zeroed:
        lm_logits(model, ids)
    assert all(torch.all(out[:, 1:] == 0) and torch.any(out[:, 0] != 0) for out in zeroed.outputs)


def test_activation_cache_resumes_after_a_kill_and_reads_back(tiny, tmp_path: Path, monkeypatch):
    model, _ = tiny
    blocks = torch.cat([tokens(6, 11, seed) for seed in range(4)])  # 24 blocks of 10 tokens after the start
    settings = dict(identity={"m": 1}, batch_size=3, seed=0, max_tokens=70, shard_tokens=30, progress=False)
    reference = build_cache(model, blocks, tmp_path / "ref", **settings)
    assert [s["tokens"] for s in reference["shards"]] == [30, 30, 10]

    real_write, writes = cache_module._write_shard, []

    def die_on_second_shard(path, mlp_in, mlp_out):
        if writes:
            raise KeyboardInterrupt
        writes.append(path)
        real_write(path, mlp_in, mlp_out)

    monkeypatch.setattr(cache_module, "_write_shard", die_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build_cache(model, blocks, tmp_path / "killed", **settings)
    monkeypatch.setattr(cache_module, "_write_shard", real_write)
    resumed = build_cache(model, blocks, tmp_path / "killed", **settings)
    assert resumed == reference
    ref_chunks, got_chunks = cache_chunks(tmp_path / "ref", (2, 32)), cache_chunks(tmp_path / "killed", (2, 32))
    for _ in range(4):  # 3 shards, then it loops back to the first
        for a, b in zip(next(ref_chunks), next(got_chunks)):
            assert torch.equal(a, b)
    first_in, first_out = next(cache_chunks(tmp_path / "ref", (2, 32), start_chunk=3))
    harvested_in, harvested_out = harvest_batch(model, next(batch_iterator(blocks, 3, 0)))  # shard 0 = batch 0
    torch.testing.assert_close(first_in, harvested_in.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(first_out, harvested_out.half().float(), rtol=0, atol=0)
    with pytest.raises(CacheError, match="built for another model"):
        build_cache(model, blocks, tmp_path / "ref", **{**settings, "identity": {"m": 2}})


def stage_config(tmp_path: Path, **train) -> CLTStageConfig:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    text = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + text * 40)
    return CLTStageConfig.model_validate({
        "data": {"source": str(corpus), "context_length": 33, "heldout_fraction": 0.2},
        "clt": {"n_features": 32},
        "harvest": {"batch_size": 4, "buffer_tokens": 512},
        "train": {"steps": 6, "batch_tokens": 128, "lr": 1e-3, "warmup_steps": 2, "checkpoint_every": 3, **train},
        "eval": {"heldout_blocks": 4, "batch_size": 4},
    })


REQUIRED = ("nmse_per_layer", "l0_per_layer", "dead_fraction", "ce_clean", "ce_replaced", "ce_zero_ablated")


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_stage_trains_exports_and_evaluates(tmp_path: Path, kind: str):
    if kind == "dense":
        source = ModelSpec(name="tiny", tiny=TINY)
    else:
        model, tokenizer = load_model("tiny", tiny=TINY)
        source = tmp_path / "sparsify" / "model"
        GatedModel(model, offset_init=1.0).save(source, tokenizer)
    out = tmp_path / "clt"
    metrics = run(stage_config(tmp_path), source, out, progress=False)
    assert all(key in metrics for key in REQUIRED)
    assert len(metrics["nmse_per_layer"]) == len(metrics["l0_per_layer"]) == 2
    assert metrics["model"]["kind"] == {"dense": "dense", "sparse": "gated"}[kind] and metrics["train_steps"] == 6
    assert 0.05 < metrics["peak_rss_gb"] < 64  # this process's max RSS, in GB (not KiB or bytes)
    for name in ("W_enc_0.safetensors", "W_dec_1.safetensors", "config.yaml", "clt.json", "metrics.json",
                 "clt_config.yaml", "per_layer.png", "training_curves.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["ce_clean"] == metrics["ce_clean"]
    assert load_clt(out).n_features == 32
    assert not (out / "checkpoints").exists()  # removed once the stage is done (train.keep_checkpoint=False)
    assert not (out / "features").exists()  # dashboards are their own step
    summary = build_features(out, source, progress=False)  # over the held-out split of the saved data config
    dashboards = open_features(out)
    assert dashboards.meta["tokens_scanned"] == summary["tokens_scanned"] > 0
    assert len(dashboards.labels()) == 2 * 32 and not dashboards.examples(0).empty
    features = dashboards.features()
    shutil.rmtree(out / "features")
    build_features(out, source, data=stage_config(tmp_path).data, progress=False)  # the same, data given
    pd.testing.assert_frame_equal(open_features(out).features(), features)
    again = run(stage_config(tmp_path), source, out, progress=False)  # retrains: the whole stage is deterministic
    assert again["nmse_per_layer"] == metrics["nmse_per_layer"]
    assert without_time(again["history"]) == without_time(metrics["history"])


def without_time(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in history]


def test_stage_resumes_from_the_final_checkpoint_without_training(tmp_path: Path, monkeypatch):
    config = stage_config(tmp_path, keep_checkpoint=True)
    source, out = ModelSpec(name="tiny", tiny=TINY), tmp_path / "clt"
    first = run(config, source, out, progress=False)
    assert (out / "checkpoints" / "clt_train_state.pt").is_file()
    monkeypatch.setattr("transcoders.stage.harvest_stream", lambda *a, **k: pytest.fail("harvested again"))
    again = run(config, source, out, progress=False)
    assert again["history"] == first["history"] and again["nmse_per_layer"] == first["nmse_per_layer"]


class Killed(Exception):
    """Stands in for a SIGKILL right after a checkpoint."""


@pytest.mark.parametrize("cache", [False, True])
def test_stage_killed_after_a_checkpoint_resumes_to_the_same_clt(tmp_path: Path, cache: bool):
    config = stage_config(tmp_path)  # 6 steps, a checkpoint every 3; 2 batches per buffer round
    config = config.model_copy(update={"cache": config.cache.model_copy(update={"enabled": cache})})
    source = ModelSpec(name="tiny", tiny=TINY)
    straight = run(config, source, tmp_path / "straight", progress=False)

    def kill(row: dict, directory: Path | None) -> None:
        raise Killed

    with pytest.raises(Killed):  # after step 3 (4 normalisation batches + 3): tokens are in the buffer
        run(config, source, tmp_path / "killed", progress=False, on_checkpoint=kill)
    resumed = run(config, source, tmp_path / "killed", progress=False)
    assert without_time(resumed["history"]) == without_time(straight["history"])
    for name in ("W_enc_0", "W_enc_1", "W_dec_0", "W_dec_1"):  # the exported CLT, bit for bit
        file = f"{name}.safetensors"
        assert (tmp_path / "killed" / file).read_bytes() == (tmp_path / "straight" / file).read_bytes(), file


def test_a_refused_resume_leaves_the_output_directory_as_it_was(tmp_path: Path):
    out = tmp_path / "clt"
    (out / "checkpoints").mkdir(parents=True)
    torch.save({"fingerprint": "another config", "step": 3}, out / "checkpoints" / "clt_train_state.pt")
    (out / "clt_config.yaml").write_text("the config that wrote the checkpoint\n")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(CheckpointError, match="different CLT config or model"):
        run(stage_config(tmp_path), ModelSpec(name="tiny", tiny=TINY), out, progress=False)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_stage_refuses_a_clt_too_big_for_the_memory_budget(tmp_path: Path):
    config = stage_config(tmp_path).model_copy(update={"memory_budget_gb": 1e-5})
    with pytest.raises(CLTMemoryError, match="About n_features="):
        run(config, ModelSpec(name="tiny", tiny=TINY), tmp_path / "clt", progress=False)
    assert not (tmp_path / "clt" / "checkpoints").exists()  # refused before training started
