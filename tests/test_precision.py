"""Mixed precision (runtime/precision.py): configs refuse unknown values, hardware without bf16 is refused
with one clear error, and each stage under bf16 agrees with fp32 on tiny models within a stated tolerance."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file

from attribution.config import AttributionStageConfig
from attribution.stage import Attributor
from circuits.__main__ import main as circuits_main
from circuits.config import CircuitError, ComponentCircuitConfig
from circuits.curves import run as run_circuits
from circuits.curves import run_prepared
from circuits.hooks import prepare
from pipeline.config import load_config
from runtime import precision
from runtime.precision import (
    PrecisionError,
    autocast,
    check_precision,
    frozen_copy,
    frozen_linear_weights_in_bf16,
)
from sparse_attention import stage as sparsify_stage
from sparse_attention import train as sparsify_train
from sparse_attention.config import ModelSpec, SparsifyConfig, TrainConfig
from sparse_attention.constraint import ControllerConfig
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import byte_tokenizer, tiny_model
from sparse_attention.train import post_train
from tests.test_attribution import N_FEATURES, random_clt
from tests.test_attribution_stage import SMALL
from tests.test_circuits import make_model
from tests.test_circuits import prompts as circuit_prompts  # noqa: F401 - the fixture
from tests.test_features import heldout_blocks
from tests.test_features import random_clt as features_clt
from tests.test_transcoders_stage import stage_config
from transcoders import stage as clt_stage
from transcoders.clt import save_clt
from transcoders.config import CLTStageConfig, FeaturesConfig
from transcoders.feature_scan import scan_activations

pytestmark = pytest.mark.usefixtures("one_thread")
needs_bf16 = pytest.mark.skipif(not precision.bf16_supported("cpu"), reason="this CPU has no bfloat16 units")


@pytest.mark.parametrize("make", [
    lambda value: SparsifyConfig.model_validate({"train": {"precision": value}}),
    lambda value: CLTStageConfig(precision=value),
    lambda value: FeaturesConfig(precision=value),
    lambda value: ComponentCircuitConfig(precision=value),
    lambda value: AttributionStageConfig(precision=value),
])
def test_configs_take_fp32_or_bf16_and_refuse_anything_else(make):
    for value in ("fp32", "bf16"):
        make(value)
    for bad in ("fp16", "float32", "bfloat16", ""):
        with pytest.raises(ValidationError, match="precision"):
            make(bad)


AUTO_CONFIGS = [  # the stages that default to "auto": (config from a precision value, its precision)
    (lambda **value: SparsifyConfig.model_validate({"train": value}), lambda config: config.train.precision),
    (lambda **value: CLTStageConfig(**value), lambda config: config.precision),
    (lambda **value: FeaturesConfig(**value), lambda config: config.precision),
]


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_is_validated_into_bf16_where_the_cpu_has_bf16_units_and_fp32_elsewhere(monkeypatch, has_bf16):
    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = "bf16" if has_bf16 else "fp32"
    assert precision.auto_precision() == expected
    for make, precision_of in AUTO_CONFIGS:
        assert precision_of(make()) == precision_of(make(precision="auto")) == expected  # the default is auto
        assert precision_of(make(precision="fp32")) == "fp32" and precision_of(make(precision="bf16")) == "bf16"
        saved = make().model_dump(mode="json")  # what the stage writes beside its outputs: the resolved value
        assert f'"precision": "{expected}"' in json.dumps(saved) and '"precision": "auto"' not in json.dumps(saved)


def test_auto_needs_bf16_on_every_device_the_process_can_use(monkeypatch):
    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "bf16_supported", lambda device: device == "cpu")  # a GPU without bf16
    assert precision.auto_precision() == "fp32"
    with pytest.raises(ValueError, match="'auto' is resolved when a config is validated"):
        check_precision("auto", "cpu")


def test_defaults_auto_where_results_stay_equal_and_fp32_for_attribution_and_circuits():
    for make, precision_of in AUTO_CONFIGS:
        assert precision_of(make()) == precision.auto_precision()
    assert AttributionStageConfig().precision == "fp32" and ComponentCircuitConfig().precision == "fp32"
    with pytest.raises(ValidationError, match="dtype"):  # the old harvest setting is folded into `precision`
        CLTStageConfig.model_validate({"harvest": {"dtype": "bfloat16"}})


def test_hardware_without_bf16_is_refused_with_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: False)
    assert not precision.bf16_supported("cpu")
    with pytest.raises(PrecisionError, match="no native bfloat16 support.*precision: fp32"):
        check_precision("bf16", "cpu")
    with pytest.raises(PrecisionError):
        with autocast("bf16", "cpu"):
            pytest.fail("the block must not run")
    with autocast("fp32", "cpu"):  # fp32 runs everywhere
        assert not torch.is_autocast_enabled("cpu")
    model, _ = tiny_model(SMALL)
    with pytest.raises(PrecisionError):  # before the first step, not a silent fp32 run
        post_train(GatedModel(model, offset_init=1.0), model, torch.zeros(4, 8, dtype=torch.long),
                   TrainConfig(steps=1, precision="bf16"), ControllerConfig(), learn_offset=True, progress=False)
    with pytest.raises(PrecisionError):
        clt_stage.run(stage_config(tmp_path).model_copy(update={"precision": "bf16"}),
                      ModelSpec(name="tiny", tiny=SMALL), tmp_path / "clt", progress=False)
    with pytest.raises(PrecisionError):  # component circuits: the model is never prepared
        prepare(model, precision="bf16")
    with pytest.raises(SystemExit) as exit_info:  # the command line: one error line, exit 2
        circuits_main(["--tasks", "greater_than", "--dense", "tiny", "--precision", "bf16",
                       "--out", str(tmp_path / "circuits.json")])
    assert exit_info.value.code == 2 and not (tmp_path / "circuits.json").exists()


@needs_bf16
def test_autocast_computes_matmuls_in_bf16_and_fp32_turns_an_outer_autocast_off():
    a = torch.randn(8, 8)
    with autocast("bf16"):
        assert (a @ a).dtype == torch.bfloat16
        with autocast("fp32"):
            assert (a @ a).dtype == torch.float32


@needs_bf16
def test_sparsify_stage_in_bf16_matches_fp32(tmp_path: Path):
    """Tolerance: held-out CE within 0.04 nats and open-edge fraction within 0.05 after the tiny preset's
    40 steps (the two runs see the same batches and gate noise). Gate-noise seeds alone spread fp32's CE
    over 0.032 nats (seeds 0-3: 5.487-5.519) and bf16's over 0.042 with the same mean (5.4965 vs 5.4981);
    seed 0's bf16 - fp32 was 0.022 on an AVX512-BF16 CPU (AMD EPYC, 2026-12-07), less on an AMX one."""
    metrics = {}
    for value in ("fp32", "bf16"):
        config = load_config(preset="tiny").sparsify
        config = config.model_copy(update={"train": config.train.model_copy(update={"precision": value})})
        metrics[value] = sparsify_stage.run(config, tmp_path / value, progress=False)
        on_disk = json.loads((tmp_path / value / sparsify_stage.METRICS_FILE).read_text())
        saved = yaml.safe_load((tmp_path / value / sparsify_stage.CONFIG_FILE).read_text())
        assert on_disk["precision"] == saved["train"]["precision"] == value
    fp32, bf16 = metrics["fp32"], metrics["bf16"]
    assert bf16["dense_ce"] == fp32["dense_ce"]  # evaluation runs in fp32
    assert abs(bf16["sparse_ce"] - fp32["sparse_ce"]) < 0.04
    assert abs(bf16["edge_fraction"] - fp32["edge_fraction"]) < 0.05
    assert bf16["history"][0]["ce"] == pytest.approx(fp32["history"][0]["ce"], abs=0.01)  # the same first batch


def test_frozen_copy_holds_bf16_linear_weights_equal_to_the_cast_of_the_originals_and_leaves_the_model_alone():
    model, _ = tiny_model(SMALL)
    model.requires_grad_(False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert frozen_copy(model, "fp32") is model
    copied = frozen_copy(model, "bf16")
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, before[name])
    linear = {f"{name}.weight" for name, module in copied.named_modules() if isinstance(module, torch.nn.Linear)}
    assert "lm_head.weight" in linear
    for name, tensor in copied.state_dict().items():
        expected = before[name].to(torch.bfloat16) if name in linear else before[name]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the original's tie is untouched
    assert copied.model.embed_tokens.weight.dtype == torch.float32  # the copy's embedding stays fp32
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the numbers autocast gives with the fp32 weights
        assert torch.equal(copied(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_frozen_linear_weights_are_bf16_inside_the_block_and_the_untouched_fp32_originals_after_it():
    model, _ = tiny_model(SMALL)
    model.requires_grad_(False)
    q_proj = model.model.layers[0].self_attn.q_proj
    q_proj.weight.requires_grad_(True)  # trained: stays the fp32 master
    frozen = {name: (module, module.weight) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear) and module is not q_proj}
    values = {name: weight.detach().clone() for name, (_, weight) in frozen.items()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with frozen_linear_weights_in_bf16(model, "bf16"):
        for module, weight in frozen.values():
            assert module.weight.dtype == torch.bfloat16 and not module.weight.requires_grad
            assert torch.equal(module.weight, weight.detach().to(torch.bfloat16))
        assert q_proj.weight.dtype == torch.float32 and q_proj.weight.requires_grad
        assert model.model.embed_tokens.weight.dtype == torch.float32  # the lm_head is untied, not the embedding
    for name, (module, weight) in frozen.items():
        assert module.weight is weight and torch.equal(weight, values[name]) and weight.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie is back
    with frozen_linear_weights_in_bf16(model, "fp32"):
        assert all(module.weight is weight for module, weight in frozen.values())


@needs_bf16
def test_bf16_sparsify_on_bf16_frozen_weights_equals_autocast_recasting_them_and_saves_them_unchanged(
        monkeypatch, tmp_path: Path):
    """Exact: bf16 copies of the frozen weights round as autocast does, so the training history is the one
    of fp32 frozen weights under autocast; the saved model's frozen tensors are the fp32 originals."""
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    train = TrainConfig(steps=3, batch_size=2, warmup_steps=1, checkpoint_every=10_000, precision="bf16")

    def train_gated() -> tuple[GatedModel, list[dict]]:
        model, _ = tiny_model(SMALL)
        gated = GatedModel(model, offset_init=1.0)
        result = post_train(gated, tiny_model(SMALL)[0], blocks, train, ControllerConfig(), learn_offset=True,
                            progress=False)
        return gated, [{k: v for k, v in row.items() if k != "seconds"} for row in result.history]

    original = tiny_model(SMALL)[0].state_dict()
    gated, history = train_gated()
    with monkeypatch.context() as patch:  # autocast recasts the fp32 frozen weights on every forward
        patch.setattr(sparsify_train, "frozen_linear_weights_in_bf16", lambda model, precision: contextlib.nullcontext())
        recast, recast_history = train_gated()
    assert history == recast_history
    assert gated.model.lm_head.weight is gated.model.model.embed_tokens.weight
    gated.save(tmp_path / "gated")
    saved = load_file(str(tmp_path / "gated" / "model.safetensors"))
    trained = [name for name in saved if "self_attn." in name]
    assert trained and not all(torch.equal(saved[name], original[name]) for name in trained)
    for name, tensor in saved.items():
        assert tensor.dtype == torch.float32
        if "self_attn." not in name:
            assert torch.equal(tensor, original[name]), name
    for name, tensor in gated.model.state_dict().items():
        assert torch.equal(tensor, recast.model.state_dict()[name]), name


@needs_bf16
def test_clt_stage_in_bf16_matches_fp32(tmp_path: Path):
    """Tolerance: held-out nMSE per layer within 0.01 (absolute) at equal tokens; fp32 evaluation."""
    metrics = {}
    for value in ("fp32", "bf16"):
        config = stage_config(tmp_path).model_copy(update={"precision": value})
        metrics[value] = clt_stage.run(config, ModelSpec(name="tiny", tiny=SMALL), tmp_path / value, progress=False)
        on_disk = json.loads((tmp_path / value / clt_stage.METRICS_FILE).read_text())
        saved = yaml.safe_load((tmp_path / value / clt_stage.CONFIG_FILE).read_text())
        assert on_disk["precision"] == saved["precision"] == value
    fp32, bf16 = metrics["fp32"], metrics["bf16"]
    assert bf16["train_tokens_seen"] == fp32["train_tokens_seen"]
    assert bf16["nmse_per_layer"] == pytest.approx(fp32["nmse_per_layer"], abs=0.01)
    assert bf16["l0_per_layer"] == pytest.approx(fp32["l0_per_layer"], rel=0.1)


@needs_bf16
def test_feature_scan_in_bf16_matches_fp32(tiny, tmp_path: Path):
    """Tolerance: per-feature active counts within 2% of the tokens scanned, top activations within 0.05
    (relative); the precision is recorded with the dashboards' config."""
    model, tokenizer = tiny
    blocks = heldout_blocks(tmp_path, tokenizer)
    clt = features_clt()
    states = {value: scan_activations(model, clt, blocks, FeaturesConfig(tokens=10_000, top_k=4, n_random=0,
                                                                          window=5, precision=value), progress=False)
              for value in ("fp32", "bf16")}
    fp32, bf16 = states["fp32"], states["bf16"]
    assert bf16.tokens_done == fp32.tokens_done
    assert (bf16.count - fp32.count).abs().max() <= 0.02 * fp32.tokens_done
    assert (fp32.count > 0).sum() > 10  # features that fire: the comparison means something
    torch.testing.assert_close(bf16.top_act[..., 0], fp32.top_act[..., 0], rtol=0.05, atol=0.01)


@needs_bf16
def test_component_circuits_in_bf16_match_fp32(circuit_prompts):  # noqa: F811 - the fixture
    """Tolerance: the clean and corrupted metrics within 0.02 (logit diff); heads (ranked by exact patching):
    every curve point's explained effect within 0.1 and the count at target within one head; edges (EAP-IG
    ranks, where bf16 swaps near ties): the count from which the curve stays at the target within two edges.
    The precision is in the result's config."""
    results = {value: run_circuits(ComponentCircuitConfig(curve_points=4, refine=False, role_edges=False,
                                                          precision=value), make_model("dense"), byte_tokenizer(),
                                   circuit_prompts)
               for value in ("fp32", "bf16")}
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16.config["precision"] == "bf16" and fp32.config["precision"] == "fp32"
    assert bf16.metric_clean == pytest.approx(fp32.metric_clean, abs=0.02)
    assert bf16.metric_corrupted == pytest.approx(fp32.metric_corrupted, abs=0.02)
    assert bf16.heads.counts == fp32.heads.counts
    assert bf16.heads.effects == pytest.approx(fp32.heads.effects, abs=0.1)
    assert abs(bf16.heads.count_at_target - fp32.heads.count_at_target) <= 1
    assert abs(bf16.edges.count_stays_above - fp32.edges.count_stays_above) <= 2
    with pytest.raises(CircuitError, match="prepared for precision 'fp32'"):
        run_prepared(ComponentCircuitConfig(precision="bf16"), prepare(make_model("dense")), byte_tokenizer(),
                     circuit_prompts)


@needs_bf16
def test_attribution_with_a_bf16_forward_matches_fp32(tmp_path: Path):
    """Tolerance: the same nodes up to 2% (a feature at its threshold may flip), and on the edges between
    nodes of both graphs, weights within 0.05 of the largest |edge|."""
    save_clt(random_clt(SMALL.n_layers, SMALL.d_model, N_FEATURES, seed=0), tmp_path / "clt")
    attributor = Attributor.load(ModelSpec(name="tiny", tiny=SMALL), tmp_path / "clt", "dense")
    records = {value: attributor.record("The cat sat on", AttributionStageConfig(precision=value))
               for value in ("fp32", "bf16")}
    edges = []
    for value in ("fp32", "bf16"):
        tables = records[value].tables
        nodes = tables["nodes"].to_pandas()
        name = dict(zip(nodes["node_index"], zip(nodes["kind"], nodes["layer"], nodes["pos"], nodes["feature"])))
        table = tables["edges"].to_pandas()
        edges.append({(name[t], name[s]): w for t, s, w in zip(table["target"], table["source"], table["weight"])})
    fp32_nodes = {n for pair in edges[0] for n in pair}
    bf16_nodes = {n for pair in edges[1] for n in pair}
    assert len(fp32_nodes ^ bf16_nodes) <= 0.02 * len(fp32_nodes)
    common = edges[0].keys() & edges[1].keys()
    assert len(common) >= 0.9 * len(edges[0])
    scale = max(abs(w) for w in edges[0].values())
    assert max(abs(edges[0][key] - edges[1][key]) for key in common) <= 0.05 * scale
    assert json.loads(records["bf16"].tables["graphs"].to_pylist()[0]["settings"])["precision"] == "bf16"
