"""The gated model on a tiny Llama, save/load, resume after a kill, and the sparsify stage end to end."""

import copy
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers.modeling_outputs import CausalLMOutputWithPast

from pipeline.config import ConfigError, load_config, parse_config
from prompts.training import padded_clean, task_distillation
from runtime.checkpoint import CheckpointError
from sparse_attention import stage
from sparse_attention.config import SparsifyConfig, TaskDistillConfig, TrainConfig
from sparse_attention.constraint import ControllerConfig, LagrangeController, StreamMultipliers
from sparse_attention.data import batch_iterator
from sparse_attention.evaluate import compare_on_heldout, next_token_ce, next_token_kl, plot_training_curves
from sparse_attention.gated_attention import GATE_FILE, GatedModel, GateError, GateRecord, load_gated_model
from sparse_attention.models import ModelLoadError, TinyModelConfig, byte_tokenizer, load_model, tiny_model
from sparse_attention.train import TrainingDiverged, answer_position_kl, divergence, post_train

REPO = Path(__file__).resolve().parent.parent
TINY = TinyModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, seed=3)


@pytest.fixture
def model_and_tokens():
    model, _ = tiny_model(TINY)
    tokens = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_all_gates_open_equals_original(model_and_tokens):
    model, tokens = model_and_tokens
    padding = torch.ones_like(tokens)
    padding[1, :4] = 0  # left padding in one row
    reference = copy.deepcopy(model)
    expected = reference(input_ids=tokens).logits
    expected_padded = reference(input_ids=tokens, attention_mask=padding).logits
    gated = GatedModel(model, offset_init=1e4).eval()
    torch.testing.assert_close(gated(tokens).logits, expected, rtol=0, atol=1e-5)
    got = gated(tokens, attention_mask=padding).logits
    torch.testing.assert_close(got[padding.bool()], expected_padded[padding.bool()], rtol=0, atol=1e-5)


def test_gated_model_is_called_like_a_hf_causal_lm(model_and_tokens):
    model, tokens = model_and_tokens
    expected = copy.deepcopy(model)(input_ids=tokens, labels=tokens, output_attentions=True)
    gated = GatedModel(model, offset_init=0.0).eval().set_mode("dense")
    out = gated(input_ids=tokens, labels=tokens, output_attentions=True)
    assert isinstance(out, CausalLMOutputWithPast) and isinstance(out.gate_record, GateRecord)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)  # keyword arguments reach the HF model
    assert len(out.attentions) == TINY.n_layers and len(out.gate_record.open_edges) == TINY.n_layers
    assert gated(tokens).attentions is None and gated(tokens).gate_record.gate_masks == []
    with pytest.raises(GateError, match="use_cache=False"):
        gated(tokens, use_cache=True)


def test_all_gates_closed_removes_attention(model_and_tokens):
    model, tokens = model_and_tokens
    without_attention = copy.deepcopy(model)
    for layer in without_attention.model.layers:
        layer.self_attn.o_proj.weight.data.zero_()
    gated = GatedModel(model, offset_init=-1e4).eval()
    out = gated(tokens, record_masks=True)
    torch.testing.assert_close(out.logits, without_attention(input_ids=tokens).logits, rtol=0, atol=1e-6)
    open_edges, pairs = out.gate_record.edge_counts()
    assert open_edges.sum() == 0 and pairs.sum() == 2 * 4 * 3 * (12 * 13 // 2)


def test_train_mode_records_differentiable_regulariser(model_and_tokens):
    model, tokens = model_and_tokens
    gated = GatedModel(model, offset_init=0.0).set_mode("train")
    record = gated(tokens).gate_record
    assert len(record.expected_open) == TINY.n_layers
    record.regulariser().backward()
    assert gated.offsets.grad is not None and (gated.offsets.grad > 0).all()  # raising b opens gates


def test_save_load_round_trip_is_exact(tmp_path, model_and_tokens):
    model, tokens = model_and_tokens
    _, tokenizer = tiny_model(TINY)
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.randn(gated.offsets.shape, generator=torch.Generator().manual_seed(1)))
    gated.eval().set_mode("eval")
    gated.save(tmp_path / "ckpt", tokenizer)
    loaded, _ = load_gated_model(tmp_path / "ckpt")
    assert torch.equal(loaded(tokens).logits, gated(tokens).logits)
    assert torch.equal(loaded.offsets, gated.offsets)


def test_a_closed_head_opens_no_gate_writes_nothing_and_leaves_the_other_heads_of_its_layer_alone(model_and_tokens):
    model, tokens = model_and_tokens
    free = GatedModel(copy.deepcopy(model), offset_init=2.0)
    closed = GatedModel(model, offset_init=2.0, closed_heads=[(0, 1), (1, 3)])
    for mode in ("eval", "train"):
        free.set_mode(mode, noise=False), closed.set_mode(mode, noise=False)
        a, b = free(tokens, output_attentions=True), closed(tokens, output_attentions=True)
        open_edges, pairs = b.gate_record.edge_counts()
        assert open_edges[0, 1] == 0 and open_edges[1, 3] == 0 and pairs[0, 1] > 0  # its pairs still count
        assert (b.attentions[0][:, 1] == 0).all() and (b.attentions[1][:, 3] == 0).all()
        assert torch.equal(open_edges[0, [0, 2, 3]], a.gate_record.edge_counts()[0][0, [0, 2, 3]])  # layer 0's input
        assert torch.equal(b.attentions[0][:, [0, 2, 3]], a.attentions[0][:, [0, 2, 3]])
        if mode == "train":
            assert b.gate_record.expected_open[0][1] == 0 and b.gate_record.expected_open[1][3] == 0
            assert torch.equal(b.gate_record.expected_open[0][[0, 2, 3]], a.gate_record.expected_open[0][[0, 2, 3]])
    with pytest.raises(GateError, match="closed head L2H0 is not in the model"):
        GatedModel(copy.deepcopy(model), offset_init=2.0, closed_heads=[(2, 0)])


def test_closed_heads_survive_save_and_load_and_a_bad_list_is_refused(tmp_path, model_and_tokens):
    model, tokens = model_and_tokens
    _, tokenizer = tiny_model(TINY)
    gated = GatedModel(model, offset_init=2.0, offset_scope="model", closed_heads=[(1, 2)]).eval()
    gated.save(tmp_path / "ckpt", tokenizer)
    meta = json.loads((tmp_path / "ckpt" / "gate.json").read_text())
    assert meta["closed_heads"] == [[1, 2]]
    loaded, _ = load_gated_model(tmp_path / "ckpt")
    assert loaded.closed_heads == [(1, 2)] and torch.equal(loaded(tokens).logits, gated(tokens).logits)
    (tmp_path / "ckpt" / "gate.json").write_text(json.dumps({**meta, "closed_heads": [[1, "2"]]}))
    with pytest.raises(GateError, match="not a list of \\[layer, head\\] integer pairs"):
        load_gated_model(tmp_path / "ckpt")


def test_closed_heads_config_names_heads_once():
    from sparse_attention.config import GateConfig

    assert GateConfig(closed_heads=["L2H4", "l0h8"]).closed_head_indices == [(2, 4), (0, 8)]
    for bad in (["2H4"], ["L2"], ["L2H4", "L2H4"]):
        with pytest.raises(ValueError):
            GateConfig(closed_heads=bad)


def test_load_errors(tmp_path, model_and_tokens):
    with pytest.raises(GateError, match="does not exist"):
        load_gated_model(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(GateError, match="not a gated checkpoint"):
        load_gated_model(tmp_path / "plain")
    model, _ = model_and_tokens
    GatedModel(model, 1.0).save(tmp_path / "broken")
    (tmp_path / "broken" / GATE_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(GateError, match="corrupted"):
        load_gated_model(tmp_path / "broken")
    with pytest.raises(ModelLoadError):
        load_model("no-such-model")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"sparsify\.train\.steps"):
        parse_config({"sparsify": {"train": {"steps": 0}}}, "test")
    with pytest.raises(ConfigError, match=r"sparsify\.train\.bogus"):
        parse_config({"sparsify": {"train": {"bogus": 1}}}, "test")
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsify: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path=tmp_path / "missing.yaml")


def _train_run(checkpoint_dir, steps=6, kill_at=None, global_seed=0, task_distill_weight=0.0, task_batches=None,
               divergence_limit=0.5, divergence_steps=4):
    torch.manual_seed(global_seed)  # the gate noise must not depend on it
    model, _ = tiny_model(TINY)
    reference = copy.deepcopy(model)
    gated = GatedModel(model, offset_init=1.0)
    blocks = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(5))
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, offset_lr=0.1, warmup_steps=1, checkpoint_every=2,
                      task_distill=TaskDistillConfig(weight=task_distill_weight), divergence_limit=divergence_limit,
                      divergence_steps=divergence_steps)

    def maybe_kill(row):
        if row["step"] == kill_at:
            raise KeyboardInterrupt("simulated kill")

    result = post_train(gated, reference, blocks, cfg, ControllerConfig(), learn_offset=True,
                        checkpoint_dir=checkpoint_dir, config_fingerprint="fp", progress=False, on_step=maybe_kill,
                        task_batches=task_batches)
    return gated, result


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    straight, straight_result = _train_run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train_run(tmp_path / "b", kill_at=5)  # last checkpoint is at step 4; step 5 is lost
    resumed, resumed_result = _train_run(tmp_path / "b")
    assert torch.equal(resumed.offsets, straight.offsets)
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    drop_time = [{k: v for k, v in row.items() if k != "seconds"} for row in straight_result.history]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed_result.history] == drop_time


def test_divergence_is_the_last_rows_all_above_the_limit_on_the_controllers_gates():
    hard = [{"step": i + 1, "hard_constraint_value": v, "constraint_value": 0.0} for i, v in enumerate([0.9, 0.2, 0.7, 0.8])]
    assert divergence(hard, 0.5, 2) == hard[2:]
    assert divergence(hard, 0.5, 3) is None  # step 2 is under the limit
    assert divergence(hard, 0.75, 2) is None
    assert divergence(hard, None, 1) is None
    assert divergence(hard[:1], 0.5, 2) is None  # fewer rows than steps
    noisy = [{"step": i + 1, "constraint_value": v} for i, v in enumerate([0.6, 0.7])]  # train_gates signal
    assert divergence(noisy, 0.5, 2) == noisy


def test_a_diverging_run_stops_at_the_first_rows_above_the_limit_keeps_its_checkpoint_and_resumes_exactly(tmp_path):
    straight, straight_result = _train_run(tmp_path / "a", divergence_limit=None)
    values = [row["hard_constraint_value"] for row in straight_result.history]  # KL on the deterministic gates
    pair = max(range(len(values) - 1), key=lambda i: min(values[i], values[i + 1]))
    limit = min(values[pair], values[pair + 1]) * (1 - 1e-6)  # two steps in a row are above it
    stop = next(i for i in range(1, len(values)) if values[i - 1] > limit and values[i] > limit)  # 0-based
    with pytest.raises(TrainingDiverged, match=rf"for 2 steps \(steps {stop}-{stop + 1}:"):
        _train_run(tmp_path / "b", divergence_limit=limit, divergence_steps=2)
    kept = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert kept["step"] == stop // 2 * 2  # the last checkpoint (every 2 steps) before the stopping step
    resumed, resumed_result = _train_run(tmp_path / "b", divergence_limit=None)  # train on from it
    assert without_time(resumed_result.history) == without_time(straight_result.history)
    assert torch.equal(resumed.offsets, straight.offsets)
    config = load_config(preset="tiny").sparsify
    off = config.model_copy(update={"train": config.train.model_copy(update={"divergence_limit": None})})
    assert stage.training_fingerprint(off) == stage.training_fingerprint(config)


def test_gate_noise_comes_from_its_own_checkpointed_generator(tmp_path):
    straight, straight_result = _train_run(tmp_path / "a")
    other, other_result = _train_run(tmp_path / "b", global_seed=12345)  # the global generator elsewhere
    assert torch.equal(other.offsets, straight.offsets)
    assert without_time(other_result.history) == without_time(straight_result.history)
    state = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)
    assert state["gate_noise"].dtype == torch.uint8 and state["gate_noise"].numel() > 0
    with pytest.raises(KeyboardInterrupt):
        _train_run(tmp_path / "c", kill_at=3)  # last checkpoint at step 2
    resumed, resumed_result = _train_run(tmp_path / "c", global_seed=777)
    assert without_time(resumed_result.history) == without_time(straight_result.history)


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# The tiny sparsify stage in a fresh process; "disturb" draws from torch's global generator while the model
# loads (as a first run's GGUF conversion does with its random init); "kill" SIGKILLs it at its step-4 checkpoint.
STAGE_SCRIPT = """
import json, os, signal, sys
import torch
from pipeline.config import load_config
from sparse_attention import stage
out, mode = sys.argv[1], sys.argv[2]
config = load_config(preset="tiny", overrides=["sparsify.train.steps=6", "sparsify.train.checkpoint_every=2",
                                               "sparsify.eval.heldout_blocks=2", "sparsify.eval.long_blocks=0"]).sparsify
if mode != "plain":
    load_model = stage.load_model
    def disturbed_load(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        torch.rand(1000)
        return loaded
    stage.load_model = disturbed_load
def kill(row, directory):
    if mode == "kill" and row["step"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
metrics = stage.run(config, out, progress=False, on_checkpoint=kill)
print(json.dumps([{k: v for k, v in row.items() if k != "seconds"} for row in metrics["history"]]))
"""


def test_fresh_processes_give_identical_histories_and_resume_after_sigkill_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def stage_process(out: str, mode: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", STAGE_SCRIPT, str(tmp_path / out), mode], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def history(process: subprocess.Popen) -> list[dict]:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-2000:]
        return json.loads(stdout.strip().splitlines()[-1])

    plain, disturbed = stage_process("a", "plain"), stage_process("b", "disturb")
    reference = history(plain)
    assert len(reference) == 6 and history(disturbed) == reference
    killed = stage_process("c", "kill")
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "c" / stage.CHECKPOINT_DIR / "train_state.pt", weights_only=True)["step"] == 4
    assert history(stage_process("c", "disturb")) == reference  # resumed at step 4 in a fresh process


def test_foreign_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    _train_run(tmp_path / "c", steps=2)
    torch.save({"fingerprint": "other", "step": 1}, tmp_path / "c" / "train_state.pt")
    with pytest.raises(CheckpointError, match="different training config"):
        _train_run(tmp_path / "c", steps=2)
    (tmp_path / "c" / "train_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable"):
        _train_run(tmp_path / "c", steps=2)


def test_a_refused_resume_leaves_the_output_directory_as_it_was(tmp_path):
    out = tmp_path / "sparsify"
    (out / stage.CHECKPOINT_DIR).mkdir(parents=True)
    torch.save({"fingerprint": "another config", "step": 3}, out / stage.CHECKPOINT_DIR / "train_state.pt")
    (out / stage.CONFIG_FILE).write_text("the config that wrote the checkpoint\n")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(CheckpointError, match="different training config"):
        stage.run(load_config(preset="tiny").sparsify, out, progress=False)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before


def test_the_stage_keeps_closed_heads_shut_through_training_saving_and_evaluation(tmp_path):
    config = load_config(preset="tiny", overrides=["sparsify.train.steps=3", "sparsify.gate.closed_heads=[L1H2]"]).sparsify
    metrics = stage.run(config, tmp_path / "sparsify", progress=False)
    assert metrics["closed_heads"] == ["L1H2"]
    assert load_gated_model(tmp_path / "sparsify" / stage.MODEL_DIR)[0].closed_heads == [(1, 2)]
    for section in metrics["heldout_by_length"]:
        assert section["edge_fraction_per_head"][1][2] == 0.0


def test_tiny_stage_sparsifies_within_tolerance(tmp_path):
    config = load_config(preset="tiny").sparsify
    metrics = stage.run(config, tmp_path / "sparsify", progress=False)
    on_disk = json.loads((tmp_path / "sparsify" / "metrics.json").read_text())
    for key in ("dense_ce", "sparse_ce", "control_ce", "edge_fraction", "context_length"):
        assert key in on_disk
    assert on_disk["context_length"] == config.data.context_length
    assert 0.05 < on_disk["peak_rss_gb"] < 64  # this process's max RSS in GB
    assert metrics["edge_fraction"] < 0.5  # started with every gate open
    assert metrics["untrained_gated_ce"] - metrics["dense_ce"] <= config.gate.calibration_tolerance
    assert metrics["sparse_ce"] - metrics["dense_ce"] <= 2 * config.controller.tolerance
    for png in ("edge_fractions.png", "attention_patterns.png", "training_curves.png"):
        assert (tmp_path / "sparsify" / png).stat().st_size > 1000
    loaded, _ = load_gated_model(tmp_path / "sparsify" / stage.MODEL_DIR)
    assert loaded.mode == "eval" and loaded.offsets.shape == (config.model.tiny.n_layers, config.model.tiny.n_heads)
    sections = on_disk["heldout_by_length"]
    assert [(s["source"], s["context_length"]) for s in sections] == [("python-docs", 64), ("python-docs", 128)]
    assert [s["scored_tokens"] for s in sections] == [4 * 2 * 63, 4 * 127]  # as many blocks x 128 tokens each
    for section in sections:
        assert section["kl_per_token"] >= 0 and section["ce_excess"] == section["sparse_ce"] - section["dense_ce"]
        half = (section["context_length"] + 1) / 2  # causal keys per query on average
        assert section["open_keys_per_query"]["mean"] == pytest.approx(section["edge_fraction"] * half, rel=1e-9)
    assert on_disk["open_heads"]["context_length"] == 128  # the longest length when 512 is not compared
    assert on_disk["open_heads"]["heads"] == sections[1]["heads_over_threshold"]
    history = on_disk["history"]
    assert all("hard_ce_excess" in row for row in history)
    assert isinstance(SparsifyConfig.model_validate(loaded_config(tmp_path)), SparsifyConfig)


def loaded_config(tmp_path):
    return yaml.safe_load((tmp_path / "sparsify" / stage.CONFIG_FILE).read_text())


@pytest.mark.parametrize("constraint", ["ce_excess", "kl"])
def test_hard_gate_signal_equals_a_separate_eval_forward(tmp_path, constraint):
    """The controller's signal is the deterministic-gate constraint on the step's batch, measured before the
    update: an eval-mode forward of the untrained model on the first batch gives the same numbers."""
    torch.manual_seed(0)
    model, _ = tiny_model(TINY)
    reference = copy.deepcopy(model).eval()
    gated = GatedModel(model, offset_init=0.5)
    untrained = copy.deepcopy(gated).eval().set_mode("eval")
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(5))
    cfg = TrainConfig(steps=1, batch_size=4, lr=1e-3, warmup_steps=0, constraint=constraint,
                      precision="fp32")  # compared with fp32 forwards below
    controller = ControllerConfig()
    row = post_train(gated, reference, blocks, cfg, controller, learn_offset=True, checkpoint_dir=tmp_path,
                     progress=False).history[0]
    first = next(batch_iterator(blocks, cfg.batch_size, cfg.seed))
    with torch.no_grad():
        logits, reference_logits = untrained(first).logits, reference(input_ids=first).logits
    ce, reference_ce = next_token_ce(logits, first).item(), next_token_ce(reference_logits, first).item()
    expected = next_token_kl(reference_logits, logits).item() if constraint == "kl" else ce - reference_ce
    assert row["hard_ce"] == pytest.approx(ce, abs=1e-6)
    assert row["hard_ce_excess"] == pytest.approx(ce - reference_ce, abs=1e-6)
    assert row["hard_constraint_value"] == pytest.approx(expected, abs=1e-6)
    assert row["smoothed_violation"] == pytest.approx(expected - controller.tolerance, abs=1e-6)  # what lambda saw
    assert abs(row["ce"] - row["hard_ce"]) > 1e-4  # the noisy training gates give another value


def test_train_gate_signal_feeds_the_noisy_constraint(tmp_path):
    torch.manual_seed(0)
    model, _ = tiny_model(TINY)
    reference = copy.deepcopy(model)
    gated = GatedModel(model, offset_init=0.5)
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(5))
    cfg = TrainConfig(steps=1, batch_size=4, warmup_steps=0, constraint="ce_excess", controller_signal="train_gates")
    row = post_train(gated, reference, blocks, cfg, ControllerConfig(), learn_offset=True,
                     checkpoint_dir=tmp_path, progress=False).history[0]
    assert "hard_ce" not in row
    assert row["smoothed_violation"] == pytest.approx(row["constraint_value"] - ControllerConfig().tolerance)


@pytest.mark.parametrize("scope, shape", [("model", (1, 1)), ("layer", (2, 1))])
def test_offset_scope_keeps_one_value_per_group_through_training_and_save_load(tmp_path, scope, shape):
    torch.manual_seed(0)
    model, tokenizer = tiny_model(TINY)
    reference = copy.deepcopy(model)
    gated = GatedModel(model, offset_init=1.0, offset_scope=scope)
    blocks = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(5))
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, offset_lr=0.1, warmup_steps=0, checkpoint_every=2)
    post_train(gated, reference, blocks, cfg, ControllerConfig(), learn_offset=True, checkpoint_dir=tmp_path / "ck",
               progress=False)
    per_head = gated.offsets_per_head
    assert gated.offsets.shape == shape and per_head.shape == (2, 4)
    assert not torch.equal(per_head, torch.ones(2, 4))  # the offsets did train
    assert torch.equal(per_head, per_head[:, :1].expand(2, 4))  # every head of a layer shares one value
    if scope == "model":
        assert torch.equal(per_head, per_head[:1, :1].expand(2, 4))
    gated.save(tmp_path / "m", tokenizer)
    loaded, _ = load_gated_model(tmp_path / "m")
    assert loaded.offset_scope == scope and loaded.offsets.shape == shape
    assert torch.equal(loaded.offsets_per_head, per_head)


def test_loading_offsets_that_vary_within_the_scope_is_refused(tmp_path):
    model, tokenizer = tiny_model(TINY)
    gated = GatedModel(model, offset_init=1.0)
    with torch.no_grad():
        gated.offsets[0, 1] = 2.0
    gated.save(tmp_path / "m", tokenizer)
    meta = json.loads((tmp_path / "m" / "gate.json").read_text())
    (tmp_path / "m" / "gate.json").write_text(json.dumps({**meta, "offset_scope": "model"}))
    with pytest.raises(GateError, match="differ within one 'model' scope group"):
        load_gated_model(tmp_path / "m")


def test_heldout_comparison_equals_a_hand_computation(model_and_tokens):
    model, _ = model_and_tokens
    reference = copy.deepcopy(model).eval()
    gated = GatedModel(model, offset_init=0.0).eval()  # about half the random-weight gates open
    blocks = torch.randint(0, 256, (5, 10), generator=torch.Generator().manual_seed(2))
    result = compare_on_heldout(reference, gated, blocks, batch_size=2, source="text")
    with torch.no_grad():
        ref_logp = torch.log_softmax(reference(input_ids=blocks).logits[:, :-1], -1)
        sparse_logp = torch.log_softmax(gated(blocks).logits[:, :-1], -1)
        masks = gated(blocks, record_masks=True).gate_record.gate_masks  # per layer [b, h, q, k]
    targets = blocks[:, 1:, None]
    assert result.dense_ce == pytest.approx(-ref_logp.gather(-1, targets).mean().item(), abs=1e-5)
    assert result.sparse_ce == pytest.approx(-sparse_logp.gather(-1, targets).mean().item(), abs=1e-5)
    kl = (ref_logp.exp() * (ref_logp - sparse_logp)).sum(-1).mean().item()
    assert result.kl_per_token == pytest.approx(kl, abs=1e-6) and kl > 1e-4
    assert result.tokens == 5 * 9
    open_per_head = torch.stack([m.sum(dim=(0, 2, 3)) for m in masks]).numpy()  # [layer, head]
    assert (result.edges.open_edges == open_per_head).all()
    section = result.to_json()
    keys_per_query = open_per_head / (5 * 10)  # open keys / queries
    np.testing.assert_allclose(section["open_keys_per_query_per_head"], keys_per_query, rtol=1e-12)
    assert section["open_keys_per_query"]["mean"] == pytest.approx(keys_per_query.mean(), rel=1e-12)
    assert result.edges.heads_over(0.0) and result.edges.heads_over(1.0) == []
    over = result.edges.heads_over(0.5)
    assert {(h["layer"], h["head"]) for h in over} == {tuple(i) for i in np.argwhere(result.edges.fraction_per_head > 0.5)}
    assert [h["edge_fraction"] for h in over] == sorted((h["edge_fraction"] for h in over), reverse=True)


def test_task_prompts_without_an_evaluator_is_refused_before_any_work(tmp_path):
    config = load_config(preset="tiny", overrides=["sparsify.eval.task_prompts=4"]).sparsify
    with pytest.raises(ValueError, match="task_prompts > 0 needs a task evaluator"):
        stage.run(config, tmp_path / "sparsify", progress=False)
    assert not (tmp_path / "sparsify").exists()


def test_a_long_length_beyond_the_model_context_is_refused(tmp_path):
    config = load_config(preset="tiny").sparsify
    context = load_model(config.model.name, tiny=config.model.tiny)[0].config.max_position_embeddings
    config = load_config(preset="tiny", overrides=[f"sparsify.data.long_context_length=[128, {context + 1}]"]).sparsify
    with pytest.raises(ValueError, match=f"data.long_context_length {context + 1} exceeds the model's context {context}"):
        stage.run(config, tmp_path / "sparsify", progress=False)


def test_mixed_sources_and_lengths_train_resume_exactly_and_are_evaluated(tmp_path):
    """Training that mixes python-docs with a second corpus and puts every 2nd step at 128 tokens: the steps
    alternate lengths, a run killed after its step-4 checkpoint resumes to the uninterrupted history, the
    config keeps the mix, and every mixed source is compared on its held-out split."""
    second = tmp_path / "second"
    second.mkdir()
    for i in range(30):
        (second / f"{i:02d}.txt").write_text(f"Story {i}: the quick brown fox jumps over the lazy dog. " * 20)
    overrides = ["sparsify.train.steps=6", "sparsify.train.checkpoint_every=2", "sparsify.train.precision=fp32",
                 "sparsify.eval.heldout_blocks=2", "sparsify.eval.long_blocks=1", "sparsify.eval.lengths=[128]",
                 f"sparsify.data.mix={{python-docs: 1.0, {second}: 1.0}}", "sparsify.data.long_context_length=128",
                 "sparsify.data.long_every=2"]
    config = load_config(preset="tiny", overrides=overrides).sparsify

    def kill_at_4(row, directory):
        if row["step"] == 4:
            raise KeyboardInterrupt("simulated kill")

    straight = stage.run(config, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        stage.run(config, tmp_path / "b", progress=False, on_checkpoint=kill_at_4)
    resumed = stage.run(config, tmp_path / "b", progress=False)
    assert without_time(resumed["history"]) == without_time(straight["history"])
    assert [row["context_length"] for row in straight["history"]] == [64, 128] * 3
    assert [row["tokens"] for row in straight["history"]] == [512, 1024, 1536, 2048, 2560, 3072]  # 8x64 = 4x128
    assert straight["train_mix"] == {"python-docs": 0.5, str(second): 0.5} and straight["train_lengths"] == [64, 128]
    assert [(s["source"], s["context_length"]) for s in straight["heldout_by_length"]] == [
        ("python-docs", 128), (str(second), 128)]
    saved = SparsifyConfig.model_validate(yaml.safe_load((tmp_path / "a" / stage.CONFIG_FILE).read_text()))
    assert saved.data.mix == {"python-docs": 1.0, str(second): 1.0} and saved.data.long_every == 2
    other = load_config(preset="tiny", overrides=[*overrides, f"sparsify.data.mix={{python-docs: 3.0, {second}: 1.0}}"])
    assert stage.training_fingerprint(other.sparsify) != stage.training_fingerprint(config)  # the mix is trained on


def _two_stream_run(checkpoint_dir, per_stream, steps=6, kill_at=None):
    """A tiny run whose batches alternate between two streams (16- and 12-token blocks, lengths as names)."""
    torch.manual_seed(0)
    model, _ = tiny_model(TINY)
    reference = copy.deepcopy(model).eval()
    gated = GatedModel(model, offset_init=0.5)
    long = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(5))
    short = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(6))
    keys = [("a", 16), ("b", 12)]

    def batches(start):
        iterators = [batch_iterator(long, 4, 0), batch_iterator(short, 4, 1)]
        for draw in itertools.count():
            batch = next(iterators[draw % 2])
            if draw >= start:
                yield batch

    def streams(start):
        return (keys[draw % 2] for draw in itertools.count(start))

    def maybe_kill(row):
        if row["step"] == kill_at:
            raise KeyboardInterrupt("simulated kill")

    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, offset_lr=0.1, warmup_steps=0, checkpoint_every=2,
                      constraint="ce_excess", precision="fp32")
    controller = ControllerConfig(per_stream=per_stream, rate=0.5, lambda_init=2.0)
    result = post_train(gated, reference, batches, cfg, controller, learn_offset=True, streams=streams,
                        checkpoint_dir=checkpoint_dir, config_fingerprint="fp", progress=False, on_step=maybe_kill)
    return gated, result, controller


@pytest.mark.parametrize("per_stream", [False, True])
def test_per_stream_multipliers_follow_their_own_streams_only(tmp_path, per_stream):
    """Each stream's multiplier equals a controller fed only that stream's deterministic-gate CE excess; with one
    multiplier it is fed every batch. The history names each step's stream."""
    _, result, controller = _two_stream_run(tmp_path, per_stream)
    history = result.history
    assert [row["stream"] for row in history] == ["a@16", "b@12"] * 3
    fed = {}
    for row in history:
        key = row["stream"] if per_stream else "all"
        expected = fed.setdefault(key, LagrangeController(controller))
        assert row["multiplier"] == pytest.approx(expected.update(row["hard_constraint_value"]), rel=1e-12)
        if per_stream:
            assert row["multipliers"][key] == row["multiplier"]
        else:
            assert "multipliers" not in row
    assert set(fed) == ({"a@16", "b@12"} if per_stream else {"all"})
    if per_stream:
        assert history[-1]["multipliers"]["a@16"] != history[-1]["multipliers"]["b@12"]
        plot_training_curves(history, tmp_path / "curves.png")  # one line per stream's multiplier
        assert (tmp_path / "curves.png").stat().st_size > 0


def test_per_stream_run_resumes_exactly_after_a_kill(tmp_path):
    straight, straight_result, _ = _two_stream_run(tmp_path / "a", per_stream=True)
    with pytest.raises(KeyboardInterrupt):
        _two_stream_run(tmp_path / "b", per_stream=True, kill_at=5)
    resumed, resumed_result, _ = _two_stream_run(tmp_path / "b", per_stream=True)
    assert [r["multipliers"] for r in resumed_result.history] == [r["multipliers"] for r in straight_result.history]
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_one_multiplier_state_seeds_every_stream_and_a_mismatch_is_refused():
    single = LagrangeController(ControllerConfig(lambda_init=3.0))
    single.update(0.5)
    multipliers = StreamMultipliers(ControllerConfig(per_stream=True))
    multipliers.load_state_dict(single.state_dict())
    for stream in (("docs", 128), ("brown", 512)):
        assert multipliers[stream].state_dict() == single.state_dict()
    state = multipliers.state_dict()
    assert set(state["controllers"]) == {"docs@128", "brown@512"}
    with pytest.raises(ValueError, match="per stream"):
        StreamMultipliers(ControllerConfig(per_stream=False)).load_state_dict(state)
    with pytest.raises(ValueError, match="per_stream needs the stream"):
        post_train(GatedModel(tiny_model(TINY)[0], offset_init=1.0), tiny_model(TINY)[0],
                   torch.zeros(4, 8, dtype=torch.long), TrainConfig(steps=1, batch_size=2),
                   ControllerConfig(per_stream=True), learn_offset=True, progress=False)


def test_later_options_change_the_training_fingerprint_and_their_old_behaviour_is_left_out():
    """controller.per_stream=False and train.head_cap=None train as before the options existed: the fingerprint is
    the hash of the config without them, so checkpoints written before them resume; other values train otherwise."""
    import hashlib

    config = SparsifyConfig()
    payload = config.model_dump(mode="json", exclude={"eval": True, "train": {
        "threads", "log_every", "device", "divergence_limit", "divergence_steps"}})  # those change no step
    del payload["controller"]["per_stream"], payload["train"]["head_cap"], payload["train"]["head_cap_weight"]
    del payload["train"]["head_cap_through"], payload["gate"]["closed_heads"], payload["train"]["task_distill"]
    before = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert stage.training_fingerprint(config) == before
    distill_off = config.model_copy(update={"train": config.train.model_copy(
        update={"task_distill": TaskDistillConfig(tasks=["ioi"], prompts_per_step=2)})})
    assert stage.training_fingerprint(distill_off) == before  # weight 0: its other settings change nothing
    distill_on = config.model_copy(update={"train": config.train.model_copy(
        update={"task_distill": TaskDistillConfig(weight=0.5)})})
    assert stage.training_fingerprint(distill_on) != before
    per_stream = config.model_copy(update={"controller": config.controller.model_copy(update={"per_stream": True})})
    assert stage.training_fingerprint(per_stream) != before
    capped = config.model_copy(update={"train": config.train.model_copy(update={"head_cap": 0.2})})
    assert stage.training_fingerprint(capped) != before


def test_over_cap_is_the_mean_excess_of_the_heads_above_the_cap():
    record = GateRecord(expected_open=[torch.tensor([0.5, 0.1]), torch.tensor([0.3, 0.05])])
    assert record.over_cap(0.2).item() == pytest.approx((0.3 + 0.1) / 4, abs=1e-7)
    assert record.over_cap(0.6).item() == 0.0


def test_the_fixed_offset_record_equals_the_expected_open_fraction_and_its_cap_leaves_the_offsets_alone():
    """The cap through the scores: no gradient on a layer's own offset (the last layer's offset gets none at all;
    an earlier layer's offset still reaches later layers' scores through the residual), the same on the queries."""
    model, _ = tiny_model(TINY)
    gated = GatedModel(model, offset_init=1.0, offset_scope="layer").set_mode("train", noise=False)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    record = gated(tokens, record_fixed_offset=True).gate_record
    assert len(record.expected_open_fixed_offset) == len(record.expected_open) == TINY.n_layers
    for free, fixed in zip(record.expected_open, record.expected_open_fixed_offset):
        assert torch.equal(free, fixed)
    cap = float(torch.stack(record.expected_open).detach().median())  # some heads above it
    q_weight = next(p for name, p in gated.named_parameters() if "q_proj.weight" in name)
    through_scores = torch.autograd.grad(record.over_cap(cap, fixed_offset=True), [gated.offsets, q_weight],
                                         retain_graph=True)
    through_logits = torch.autograd.grad(record.over_cap(cap), [gated.offsets, q_weight])
    last = TINY.n_layers - 1
    assert through_scores[0][last].item() == 0.0 and through_logits[0][last].item() != 0.0
    assert torch.equal(through_scores[1], through_logits[1])  # the same push on the queries


def _capped_run(head_cap: float | None) -> tuple[np.ndarray, list[dict]]:
    """8 steps on the tiny model, offset fixed: deterministic-gate open fraction per [layer, head] after them."""
    torch.manual_seed(0)
    model, _ = tiny_model(TINY)
    reference = copy.deepcopy(model)
    gated = GatedModel(model, offset_init=1.0)
    blocks = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(5))
    cfg = TrainConfig(steps=8, batch_size=4, lr=1e-2, offset_lr=0.0, warmup_steps=1, checkpoint_every=100,
                      head_cap=head_cap, head_cap_weight=50.0)
    result = post_train(gated, reference, blocks, cfg, ControllerConfig(), learn_offset=False, progress=False)
    with torch.no_grad():
        open_edges, pairs = gated.eval().set_mode("eval")(blocks[:8]).gate_record.edge_counts()
    return (open_edges / pairs).numpy(), result.history


def test_a_head_cap_pushes_the_heads_above_it_down():
    free, free_history = _capped_run(None)
    capped, capped_history = _capped_run(0.3)
    assert "over_head_cap" not in free_history[-1] and capped_history[-1]["over_head_cap"] > 0
    over = free > 0.3  # the heads the cap acts on (layer 0's stay fully open in 8 steps either way)
    assert over.sum() >= 2
    assert (capped[over] <= free[over]).all() and capped[over].mean() < free[over].mean() - 0.1, (free, capped)


TASK_TEXTS = ["The war lasted from", "a b", "When the year 1890 ended, the next"]


def test_answer_position_kl_equals_a_hand_computation_on_each_unpadded_prompt():
    model, _ = tiny_model(TINY)
    reference, _ = tiny_model(TINY.model_copy(update={"seed": 4}))
    original = copy.deepcopy(model)
    gated = GatedModel(model, offset_init=1.0).eval().set_mode("eval")
    ids, answer = padded_clean(TASK_TEXTS, byte_tokenizer())
    assert answer.tolist() == [len(text) for text in TASK_TEXTS]  # bytes, bos first
    kls = []
    for row in range(len(TASK_TEXTS)):
        alone = ids[row : row + 1, : answer[row] + 1]  # the prompt without padding
        with torch.no_grad():
            p_log = torch.log_softmax(reference(input_ids=alone).logits[0, -1].double(), -1)
            q_log = torch.log_softmax(gated(alone).logits[0, -1].double(), -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum())
    with torch.no_grad():
        got = answer_position_kl(gated, reference, ids, answer, "fp32")
    assert got.item() == pytest.approx(torch.stack(kls).mean().item(), rel=1e-5, abs=1e-7)
    assert got.item() > 0
    with torch.no_grad():
        same = answer_position_kl(gated.set_mode("dense"), original, ids, answer, "fp32")
    assert same.item() == pytest.approx(0.0, abs=1e-6)  # all gates open: the original itself


def _distilled_run(checkpoint_dir, steps=4, kill_at=None, weight=0.5, calls=None):
    texts = [TASK_TEXTS[:2], TASK_TEXTS[1:]]

    def task_batches(step):
        if calls is not None:
            calls.append(step)
        return padded_clean(texts[step % 2], byte_tokenizer())

    return _train_run(checkpoint_dir, steps=steps, kill_at=kill_at, task_distill_weight=weight,
                      task_batches=task_batches)


def test_task_distillation_trains_on_each_steps_prompts_and_resumes_exactly(tmp_path):
    calls = []
    straight, straight_result = _distilled_run(tmp_path / "a", calls=calls)
    assert calls == [0, 1, 2, 3]
    assert all(row["task_kl"] >= 0 for row in straight_result.history)
    plain, _ = _distilled_run(tmp_path / "c", weight=0.0)  # the term moves the weights
    assert not torch.equal(plain.model.model.layers[0].self_attn.q_proj.weight,
                           straight.model.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(KeyboardInterrupt):
        _distilled_run(tmp_path / "b", kill_at=3)
    resumed, resumed_result = _distilled_run(tmp_path / "b")
    for a, b in zip(resumed.model.parameters(), straight.model.parameters()):
        assert torch.equal(a, b)
    drop_time = [{k: v for k, v in row.items() if k != "seconds"} for row in straight_result.history]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed_result.history] == drop_time


def test_task_distillation_without_its_prompts_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="needs the task prompts"):
        post_train(GatedModel(tiny_model(TINY)[0], offset_init=1.0), tiny_model(TINY)[0],
                   torch.zeros(4, 8, dtype=torch.long), TrainConfig(steps=1, task_distill=TaskDistillConfig(weight=1.0)),
                   ControllerConfig(), learn_offset=True, progress=False)
    config = load_config(preset="tiny", overrides=["sparsify.train.task_distill.weight=1"]).sparsify
    with pytest.raises(ValueError, match="task_distill.weight > 0 needs the task prompts"):
        stage.run(config, tmp_path / "sparsify", progress=False)
    assert not (tmp_path / "sparsify").exists()
    with pytest.raises(ConfigError, match="names a task twice"):
        load_config(preset="tiny", overrides=["sparsify.train.task_distill.tasks=[ioi, ioi]"])


def test_the_stage_trains_on_greater_than_prompts_of_the_training_words(tmp_path):
    config = load_config(preset="tiny", overrides=[
        "sparsify.train.steps=3", "sparsify.train.task_distill.weight=1",
        "sparsify.train.task_distill.tasks=[greater_than]", "sparsify.train.task_distill.prompts_per_task=6",
        "sparsify.train.task_distill.prompts_per_step=3"]).sparsify
    metrics = stage.run(config, tmp_path / "sparsify", progress=False,
                        task_batches=task_distillation(config.train.task_distill))
    assert [row["step"] for row in metrics["history"]] == [1, 2, 3]
    assert all(row["task_kl"] >= 0 for row in metrics["history"])
    batches = task_distillation(config.train.task_distill)(byte_tokenizer())
    ids, answer = batches(1)
    assert ids.shape[0] == 3 and torch.equal(ids, batches(1)[0]) and torch.equal(answer, batches(1)[1])
    texts = [byte_tokenizer().decode(row[1 : end + 1]) for row, end in zip(ids.tolist(), answer.tolist())]
    assert all(re.search(r"(year|from) 1[89]\d\d", text) for text in texts)
