"""Exact checks of the CLT math: JumpReLU gradients, sparse vs dense decode, folding, the circuit-tracer
file layout (round trip, corrupted and partial files), and the memory estimate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from transcoders.clt import (
    CLTConfig,
    CLTFormatError,
    CrossLayerTranscoder,
    load_clt,
    load_clt_metadata,
    save_clt,
)
from transcoders.jumprelu import jumprelu
from transcoders.memory import CLTMemoryError, check_training_fits
from transcoders.train import clt_loss

torch.set_num_threads(1)


def make_clt(n_layers=3, d_model=8, n_features=16, seed=0, scaled=True, skip=False) -> CrossLayerTranscoder:
    """A random CLT with non-trivial biases, thresholds, (optionally) normalisation scales and skip path."""
    config = CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, skip=skip)
    clt = CrossLayerTranscoder(config, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if skip:
            clt.W_skip.copy_(torch.randn(n_layers, d_model, d_model, generator=g) / d_model**0.5)
        clt.b_enc.copy_(torch.randn(n_layers, n_features, generator=g) * 0.1)
        clt.b_dec.copy_(torch.randn(n_layers, d_model, generator=g))
        clt.threshold.copy_(torch.rand(n_layers, n_features, generator=g) * 0.2)
        if scaled:
            clt.input_scale.copy_(torch.rand(n_layers, generator=g) + 0.5)
            clt.output_scale.copy_(torch.rand(n_layers, generator=g) + 0.5)
    return clt


def inputs(clt: CrossLayerTranscoder, *lead: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(*lead, clt.n_layers, clt.d_model, generator=torch.Generator().manual_seed(seed)) * 2


# --- JumpReLU ------------------------------------------------------------------------------------------


def test_jumprelu_forward_is_strict_and_gradients_match_definitions():
    pre = torch.tensor([[-1.0, 0.0, 0.3, 0.5, 0.7, 1.2, 2.0]], requires_grad=True)
    threshold = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], requires_grad=True)
    bandwidth = 0.8
    out = jumprelu(pre, threshold, bandwidth)
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.7, 1.2, 2.0]]))  # pre == threshold stays off
    grad = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    out.backward(grad)
    assert pre.grad.tolist() == [[0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0]]
    # d/dthreshold = -(threshold / bandwidth) * 1[|pre - threshold| < bandwidth / 2] * grad
    inside = (pre.detach() - 0.5).abs() < bandwidth / 2  # pre in (0.1, 0.9): 0.3, 0.5, 0.7
    expected = -(0.5 / bandwidth) * inside.float() * grad
    assert inside.sum() == 3
    torch.testing.assert_close(threshold.grad, expected[0], rtol=0, atol=1e-7)


def test_jumprelu_threshold_gradient_sums_over_batch_dims():
    torch.manual_seed(0)
    pre = torch.randn(5, 3, 4, requires_grad=True)
    threshold = (torch.rand(3, 4) * 0.5).requires_grad_(True)
    grad = torch.randn(5, 3, 4)
    jumprelu(pre, threshold, 1.0).backward(grad)
    window = ((pre.detach() - threshold.detach()).abs() < 0.5).float()
    expected = (-threshold.detach() * window * grad).sum(0)
    torch.testing.assert_close(threshold.grad, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pre.grad, grad * (pre.detach() > threshold.detach()), rtol=0, atol=0)


def test_training_gradients_come_from_sae_lens_jumprelu_and_inference_needs_no_sae_lens():
    pre = torch.randn(4, 2, 3, 5, requires_grad=True)  # more than one batch dim: flattened for sae-lens
    threshold = torch.full((3, 5), 0.2, requires_grad=True)
    out = jumprelu(pre, threshold, 0.5)
    assert type(out.grad_fn).__name__ == "ViewBackward0"
    function = out.grad_fn.next_functions[0][0]._forward_cls
    assert (function.__module__, function.__name__) == ("sae_lens.saes.jumprelu_sae", "JumpReLU")
    with torch.no_grad():
        assert jumprelu(pre, threshold, 0.5).grad_fn is None
        torch.testing.assert_close(jumprelu(pre, threshold, 0.5), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match the trailing"):
        jumprelu(pre, torch.zeros(5, 3, requires_grad=True), 0.5)
    code = ("import sys, transcoders.clt, transcoders.train, attribution.stage; "
            "assert 'sae_lens' not in sys.modules, 'sae_lens imported at module import time'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stderr[-2000:]


# --- decode --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_sparse_decode_equals_dense_decode_outputs_and_gradients(lead):
    clt = make_clt()
    acts = clt.encode(inputs(clt, *lead)).detach()
    active = acts != 0
    assert 0 < active.float().mean() < 0.9  # some features on, some off: the comparison is informative
    grads = {}
    for name, decode in (("sparse", clt.decode), ("dense", clt.decode_dense)):
        clt.zero_grad(set_to_none=True)
        a = acts.clone().requires_grad_(True)
        out = decode(a)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=torch.float32)).view_as(out))
        grads[name] = (out.detach(), a.grad, [w.grad.clone() for w in clt.W_dec], clt.b_dec.grad.clone())
    (out_s, ga_s, gw_s, gb_s), (out_d, ga_d, gw_d, gb_d) = grads["sparse"], grads["dense"]
    assert out_s.shape == (*lead, clt.n_layers, clt.d_model)
    torch.testing.assert_close(out_s, out_d, rtol=0, atol=1e-5)
    torch.testing.assert_close(gb_s, gb_d, rtol=0, atol=1e-5)
    for s, d in zip(gw_s, gw_d):
        torch.testing.assert_close(s, d, rtol=0, atol=1e-5)
    torch.testing.assert_close(ga_s[active], ga_d[active], rtol=0, atol=1e-5)
    assert torch.all(ga_s[~active] == 0)  # by design: only active entries get a gradient
    assert ga_d[~active].abs().max() > 0  # ...which the dense reference does not share


def test_decode_with_no_active_feature_is_the_bias():
    clt = make_clt()
    out = clt.decode(torch.zeros(4, clt.n_layers, clt.n_features))
    torch.testing.assert_close(out, (clt.b_dec * clt.output_scale[:, None]).expand(4, -1, -1), rtol=0, atol=0)


def test_decode_matches_an_explicit_sum_over_source_layers():
    clt = make_clt(scaled=False)
    acts = clt.encode(inputs(clt, 3)).detach()
    out = clt.decode(acts)
    for target in range(clt.n_layers):
        expected = clt.b_dec[target] + sum(acts[:, s] @ clt.W_dec[s][:, target - s] for s in range(target + 1))
        torch.testing.assert_close(out[:, target], expected, rtol=0, atol=1e-5)
        layer_acts = [clt.encode_layer(s, inputs(clt, 3)[:, s]) for s in range(target + 1)]
        torch.testing.assert_close(clt.decode_layer(target, layer_acts), expected, rtol=0, atol=1e-5)


def test_training_loss_and_gradients_agree_between_sparse_and_dense_decode():
    clt = make_clt()
    x, y = inputs(clt, 9), inputs(clt, 9, seed=5)
    grads, losses = {}, {}
    for decode in ("sparse", "dense"):
        clt.zero_grad(set_to_none=True)
        terms = clt_loss(clt, x, y, sparsity_coefficient=0.1, sparsity_c=4.0, preact_coefficient=1e-3, decode=decode)
        terms.total.backward()
        losses[decode] = terms.total.item()
        grads[decode] = {n: p.grad.clone() for n, p in clt.named_parameters() if n != "threshold"}
    assert losses["sparse"] == pytest.approx(losses["dense"], abs=1e-5)
    for name, grad in grads["sparse"].items():
        torch.testing.assert_close(grad, grads["dense"][name], rtol=0, atol=1e-5, msg=name)


# --- normalisation and the file layout ------------------------------------------------------------------


def test_fold_normalisation_keeps_outputs_and_resets_scales():
    clt = make_clt()
    x = inputs(clt, 6)
    before_acts, before = clt.encode(x).detach(), clt(x).detach()
    clt.fold_normalisation()
    assert torch.all(clt.input_scale == 1) and torch.all(clt.output_scale == 1)
    torch.testing.assert_close(clt.encode(x), before_acts, rtol=0, atol=1e-5)
    torch.testing.assert_close(clt(x), before, rtol=0, atol=1e-5)


def test_folded_encoder_decoder_and_frozen_activation_compute_what_the_clt_computes():
    clt = make_clt()  # unfolded scales
    x = inputs(clt, 6)  # [6, L, D]
    (W_enc, b_enc), (W_dec, b_dec) = clt.folded_encoder(), clt.folded_decoder()
    activation = clt.frozen_activation()
    pre = torch.einsum("nld,lfd->nlf", x, W_enc) + b_enc  # [6, L, F] real units
    torch.testing.assert_close(pre, clt.pre_activations(x), rtol=0, atol=1e-5)
    acts = activation(pre)
    assert torch.equal(acts, clt.activation(pre)) and not acts.requires_grad
    recon = b_dec.expand(6, -1, -1).clone()
    for source, weight in enumerate(W_dec):  # [F, L - source, D]
        recon[:, source:] += torch.einsum("nf,fkd->nkd", acts[:, source], weight)
    torch.testing.assert_close(recon, clt.decode(acts), rtol=0, atol=1e-5)
    with torch.no_grad():
        clt.threshold.fill_(1e3)  # the frozen activation keeps the thresholds it was made with
    assert torch.equal(activation(pre), acts) and not clt.activation(pre).any()
    folded = make_clt().fold_normalisation()  # scales 1: the folded tensors are the CLT's own, no copy
    assert folded.folded_encoder()[0].data_ptr() == folded.W_enc.data_ptr()
    assert folded.folded_decoder()[0][1].data_ptr() == folded.W_dec[1].data_ptr()


def test_export_import_round_trip_in_circuit_tracer_layout(tmp_path: Path):
    clt = make_clt()
    x = inputs(clt, 6)
    save_clt(clt, tmp_path, extra={"note": "hi"}, model_name="tiny")
    L, F, D = clt.n_layers, clt.n_features, clt.d_model
    for i in range(L):
        enc, dec = load_file(tmp_path / f"W_enc_{i}.safetensors"), load_file(tmp_path / f"W_dec_{i}.safetensors")
        assert {k: tuple(v.shape) for k, v in enc.items()} == {
            f"W_enc_{i}": (F, D), f"b_enc_{i}": (F,), f"b_dec_{i}": (D,), f"threshold_{i}": (F,)}
        assert {k: tuple(v.shape) for k, v in dec.items()} == {f"W_dec_{i}": (F, L - i, D)}
    ct_config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert ct_config == {"model_kind": "cross_layer_transcoder", "feature_input_hook": "mlp.hook_in",
                         "feature_output_hook": "hook_mlp_out", "model_name": "tiny"}
    loaded = load_clt(tmp_path)
    assert torch.all(loaded.input_scale == 1) and torch.all(loaded.output_scale == 1)
    folded = make_clt().fold_normalisation()
    for name, param in folded.named_parameters():
        assert torch.equal(param, dict(loaded.named_parameters())[name]), name  # bit-identical to an in-place fold
    torch.testing.assert_close(loaded(x), clt(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded.encode(x), clt.encode(x), rtol=0, atol=1e-5)
    assert load_clt_metadata(tmp_path) == {"note": "hi"}
    assert clt.input_scale.ne(1).any()  # saving did not fold the caller's CLT


def test_save_removes_layer_files_of_a_deeper_previous_clt(tmp_path: Path):
    save_clt(make_clt(n_layers=3), tmp_path)
    save_clt(make_clt(n_layers=2), tmp_path)
    assert sorted(p.name for p in tmp_path.glob("W_*")) == [
        "W_dec_0.safetensors", "W_dec_1.safetensors", "W_enc_0.safetensors", "W_enc_1.safetensors"]
    assert load_clt(tmp_path).n_layers == 2


def test_foreign_relu_clt_without_our_metadata_loads(tmp_path: Path):
    """A CLT written by someone else: no clt.json, no thresholds (circuit-tracer then uses ReLU)."""
    clt = make_clt(scaled=False)
    for i in range(clt.n_layers):
        tensors = clt.folded_layer(i)
        dec = {f"W_dec_{i}": tensors.pop(f"W_dec_{i}")}
        tensors.pop(f"threshold_{i}")
        save_file(tensors, str(tmp_path / f"W_enc_{i}.safetensors"))
        save_file(dec, str(tmp_path / f"W_dec_{i}.safetensors"))
    loaded = load_clt(tmp_path)
    x = inputs(clt, 4)
    pre = clt.pre_activations(x)
    torch.testing.assert_close(loaded.encode(x), torch.relu(pre), rtol=0, atol=1e-6)


@pytest.mark.parametrize("damage", ["missing_dec", "missing_enc_last", "truncated", "garbled_meta", "nan",
                                    "wrong_shape", "no_dir", "empty_dir"])
def test_corrupted_or_partial_clt_gives_a_clear_error(tmp_path: Path, damage: str):
    directory = tmp_path / "clt"
    save_clt(make_clt(), directory)
    expected = {"missing_dec": "partial CLT: missing ['W_dec_1", "missing_enc_last": "partial CLT: missing ['W_enc_2",
                "truncated": "W_dec_2.safetensors", "garbled_meta": "clt.json is corrupted",
                "nan": "NaN", "wrong_shape": "W_dec_1 has shape", "no_dir": "does not exist",
                "empty_dir": "holds no W_enc_"}[damage]
    if damage == "missing_dec":
        (directory / "W_dec_1.safetensors").unlink()
    elif damage == "missing_enc_last":
        (directory / "W_enc_2.safetensors").unlink()
    elif damage == "truncated":
        path = directory / "W_dec_2.safetensors"
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "garbled_meta":
        (directory / "clt.json").write_text("{not json")
    elif damage == "nan":
        tensors = load_file(directory / "W_enc_1.safetensors")
        tensors["b_enc_1"][3] = float("nan")
        save_file(tensors, str(directory / "W_enc_1.safetensors"))
    elif damage == "wrong_shape":
        (directory / "clt.json").unlink()
        save_file({"W_dec_1": torch.zeros(16, 1, 8)}, str(directory / "W_dec_1.safetensors"))
    elif damage == "no_dir":
        directory = tmp_path / "nowhere"
    elif damage == "empty_dir":
        directory = tmp_path / "empty"
        directory.mkdir()
    with pytest.raises(CLTFormatError, match=expected.replace("[", r"\[").replace("(", r"\(")):
        load_clt(directory)


def test_truncated_file_without_metadata_is_still_caught(tmp_path: Path):
    save_clt(make_clt(), tmp_path)
    (tmp_path / "clt.json").unlink()
    path = tmp_path / "W_enc_1.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CLTFormatError, match="W_enc_1.safetensors is unreadable"):
        load_clt(tmp_path)


def test_metadata_records_sizes_and_config(tmp_path: Path):
    save_clt(make_clt(), tmp_path)
    meta = json.loads((tmp_path / "clt.json").read_text())
    assert meta["clt_config"]["n_features"] == 16 and len(meta["files"]) == 6


# --- skip path -----------------------------------------------------------------------------------------


def test_skip_path_adds_a_linear_map_of_the_input_and_folds_saves_and_loads(tmp_path: Path):
    clt = make_clt(skip=True)  # unfolded scales
    x = inputs(clt, 5)
    expected = clt.decode(clt.encode(x)) + torch.einsum(
        "nli,lio->nlo", x / clt.input_scale[:, None], clt.W_skip) * clt.output_scale[:, None]
    torch.testing.assert_close(clt(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(clt.skip_layer(1, x[:, 1]), clt.skip_output(x)[:, 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.einsum("nli,lio->nlo", x, clt.folded_skip()), clt.skip_output(x),
                               rtol=0, atol=1e-5)
    save_clt(clt, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("W_skip_*")) == [f"W_skip_{i}.safetensors" for i in range(3)]
    loaded = load_clt(tmp_path)
    assert loaded.config.skip and torch.all(loaded.output_scale == 1)
    torch.testing.assert_close(loaded(x), clt(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(clt.fold_normalisation()(x), expected, rtol=0, atol=1e-5)
    (tmp_path / "clt.json").unlink()  # someone else's export: the W_skip files alone say there is a skip path
    torch.testing.assert_close(load_clt(tmp_path)(x), expected, rtol=0, atol=1e-5)


def test_a_clt_without_skip_path_is_unchanged_and_replaces_old_skip_files(tmp_path: Path):
    clt = make_clt()
    assert clt.W_skip is None and clt.folded_skip() is None
    with pytest.raises(ValueError, match="no skip path"):
        clt.skip_output(inputs(clt, 2))
    save_clt(make_clt(skip=True), tmp_path)
    save_clt(clt, tmp_path)
    assert not list(tmp_path.glob("W_skip_*")) and not load_clt(tmp_path).config.skip


def test_missing_skip_file_is_a_partial_clt(tmp_path: Path):
    save_clt(make_clt(skip=True), tmp_path)
    (tmp_path / "W_skip_2.safetensors").unlink()
    with pytest.raises(CLTFormatError, match=r"partial CLT: missing \['W_skip_2"):
        load_clt(tmp_path)


def test_training_loss_trains_the_skip_path_on_the_reconstruction():
    clt = make_clt(skip=True)
    x = inputs(clt, 32)
    y = clt(x).detach() + 0.1
    terms = clt_loss(clt, x, y, sparsity_coefficient=0.0, sparsity_c=1.0, preact_coefficient=0.0)
    expected = ((clt(x) - y) / clt.output_scale[:, None]).pow(2).mean(dim=(0, 2))
    torch.testing.assert_close(terms.mse_per_layer, expected.detach())
    terms.total.backward()
    assert clt.W_skip.grad is not None and clt.W_skip.grad.abs().sum() > 0


# --- memory ---------------------------------------------------------------------------------------------


def test_parameter_count_matches_the_module():
    clt = make_clt(n_layers=4, d_model=6, n_features=5)
    assert clt.config.n_parameters == sum(p.numel() for p in clt.parameters())
    skip = make_clt(n_layers=4, d_model=6, n_features=5, skip=True)
    assert skip.config.n_parameters == sum(p.numel() for p in skip.parameters()) == clt.config.n_parameters + 4 * 36
    smollm2 = CLTConfig(n_layers=30, d_model=576, n_features=1)
    assert 280_000 < smollm2.n_parameters - 576 * 30 < 290_000  # ~285k weights per feature, as the issue says


def test_memory_check_refuses_a_clt_that_does_not_fit():
    config = CLTConfig(n_layers=30, d_model=576, n_features=16384)
    with pytest.raises(CLTMemoryError, match=r"n_features=16384 .* needs about .* About n_features=\d+ fits") as excinfo:
        check_training_fits(config, batch_tokens=1024, buffer_tokens=16384, model_bytes=540_000_000,
                            budget_bytes=24 * 1024**3)
    small = config.model_copy(update={"n_features": 256})
    parts = check_training_fits(small, batch_tokens=1024, buffer_tokens=16384, model_bytes=540_000_000,
                                budget_bytes=24 * 1024**3)
    assert parts["AdamW moments"] == 2 * parts["CLT weights"]
    bf16 = check_training_fits(small, batch_tokens=1024, buffer_tokens=16384, model_bytes=540_000_000,
                               budget_bytes=24 * 1024**3, precision="bf16")
    assert bf16["bf16 decoder copies"] == 256 * 576 * 30 * 31 // 2 * 2  # half the decoders' fp32 bytes
    assert sum(bf16.values()) - sum(parts.values()) == bf16["bf16 decoder copies"]
    fits = int(str(excinfo.value).split("About n_features=")[1].split()[0])
    with pytest.raises(CLTMemoryError, match=f"About n_features={fits} fits"):  # the skip path's weights are fixed
        check_training_fits(config.model_copy(update={"skip": True}), batch_tokens=1024, buffer_tokens=16384,
                            model_bytes=540_000_000 - 30 * 576 * 576 * 16, budget_bytes=24 * 1024**3)


CT_CHECK = """
import sys, torch
from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
clt = load_clt(sys.argv[1], feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
               dtype=torch.float32, device=torch.device("cpu"), lazy_decoder=False)
ref = torch.load(sys.argv[2])
acts = clt.encode(ref["x"])  # [L, pos, F]
out = clt.decode(acts.to_sparse())
print((acts - ref["acts"]).abs().max().item(), (out - ref["out"]).abs().max().item())
"""


@pytest.mark.slow
def test_circuit_tracer_reads_our_export(tmp_path: Path):
    """circuit-tracer (its own venv: CT_PYTHON, default /tmp/ct-venv/bin/python) loads our files and
    computes the same activations and reconstructions."""
    python = Path(os.environ.get("CT_PYTHON", "/tmp/ct-venv/bin/python"))
    if not python.exists():
        pytest.skip(f"no circuit-tracer venv at {python}; set CT_PYTHON (ensure_ct_venv in bench/attribution_vs_circuit_tracer.py builds one)")
    clt = make_clt()
    save_clt(clt, tmp_path / "clt", model_name="tiny")
    x = inputs(clt, 7).transpose(0, 1)  # [L, pos, D], circuit-tracer's layout
    acts = clt.encode(x.transpose(0, 1))  # [pos, L, F]
    torch.save({"x": x, "acts": acts.transpose(0, 1).detach(), "out": clt.decode(acts).transpose(0, 1).detach()},
               tmp_path / "ref.pt")
    result = subprocess.run([str(python), "-c", CT_CHECK, str(tmp_path / "clt"), str(tmp_path / "ref.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    acts_diff, out_diff = map(float, result.stdout.split()[-2:])
    assert acts_diff < 1e-5 and out_diff < 1e-5
