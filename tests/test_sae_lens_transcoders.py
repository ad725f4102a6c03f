"""sae-lens transcoders saved by sae-lens itself, loaded as the CLT of attribution: the same activations and
reconstructions as sae-lens computes, exact attribution graphs (perturbation check, also with skip
transcoders' W_skip as the CLT's skip path), and clear refusals."""

from __future__ import annotations

import shutil

import pytest
import torch

from attribution.config import GraphConfig
from attribution.graph import attribute
from attribution.nodes import build_replacement, transcoder_weights
from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt
from tests.test_attribution import (
    PROMPT,
    TINY,
    assert_removing_each_source_moves_targets_by_its_edges,
    make_model,
)
from transcoders.clt import CLTFormatError, clt_content_id, load_clt

sae_lens = pytest.importorskip("sae_lens")

N_FEATURES = 16


def make_transcoder(layer: int, kind: str = "jumprelu", seed: int = 0, hook_in: str | None = None):
    """A random sae-lens transcoder of the tiny model's layer `layer`, scaled so a fair share of features fire;
    a skip transcoder's W_skip stays zero, as sae-lens initialises it."""
    classes = {"jumprelu": (sae_lens.JumpReLUTranscoder, sae_lens.JumpReLUTranscoderConfig),
               "relu": (sae_lens.Transcoder, sae_lens.TranscoderConfig),
               "skip": (sae_lens.JumpReLUSkipTranscoder, sae_lens.JumpReLUSkipTranscoderConfig)}
    cls, config_cls = classes[kind]
    metadata = sae_lens.saes.sae.SAEMetadata(hook_name=hook_in or f"blocks.{layer}.ln2.hook_normalized",
                                             hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name="tiny")
    sae = cls(config_cls(d_in=TINY.d_model, d_sae=N_FEATURES, d_out=TINY.d_model, apply_b_dec_to_input=False,
                         metadata=metadata))
    g = torch.Generator().manual_seed(seed + layer)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(TINY.d_model, N_FEATURES, generator=g) / TINY.d_model**0.5)
        sae.b_enc.copy_(torch.randn(N_FEATURES, generator=g) * 0.1)
        sae.W_dec.copy_(torch.randn(N_FEATURES, TINY.d_model, generator=g) / N_FEATURES**0.5)
        sae.b_dec.copy_(torch.randn(TINY.d_model, generator=g) * 0.1)
        if kind != "relu":  # some thresholds negative: sae-lens' ReLU still zeroes negative pre-activations
            sae.threshold.copy_(torch.linspace(-0.2, 0.4, N_FEATURES))
    return sae.eval()


def save_set(directory, kinds=("jumprelu", "relu", "jumprelu"), skip_layers=()):
    """Transcoders of `kinds` per layer, saved by sae-lens; those of `skip_layers` (skip transcoders) get a random
    W_skip whose output is about as large as the tiny model's residual stream."""
    saes = [make_transcoder(layer, kind) for layer, kind in enumerate(kinds)]
    for layer in skip_layers:
        g = torch.Generator().manual_seed(10 + layer)
        with torch.no_grad():
            saes[layer].W_skip.copy_(torch.randn(TINY.d_model, TINY.d_model, generator=g) * 0.02 / TINY.d_model**0.5)
    for layer, sae in enumerate(saes):
        sae.save_model(directory / f"layer_{layer}")
    return saes


@pytest.mark.parametrize("skip", [False, True])
def test_loaded_transcoders_compute_what_sae_lens_computes(tmp_path, skip):
    saes = save_set(tmp_path, ("skip", "relu", "skip"), skip_layers=(0, 2)) if skip else save_set(tmp_path)
    clt = load_clt(tmp_path)
    assert clt.config.skip == skip
    x = torch.randn(50, TINY.n_layers, TINY.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        acts = clt.encode(x)  # [50, L, F]
        for layer, sae in enumerate(saes):
            expected = sae.encode(x[:, layer])
            assert 0 < (expected > 0).float().mean() < 0.9
            assert torch.equal(acts[:, layer] != 0, expected != 0)
            torch.testing.assert_close(acts[:, layer], expected, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(clt.forward(x)[:, layer], sae(x[:, layer]), rtol=1e-6, atol=1e-6)
    assert all(bool((w[:, 1:] == 0).all()) for w in clt.W_dec)  # same-layer decoders only


@pytest.mark.parametrize("skip", [False, True])
def test_attribution_with_sae_lens_transcoders_is_exact(tmp_path, skip):
    save_set(tmp_path, ("skip", "relu", "skip"), skip_layers=(0, 2)) if skip else save_set(tmp_path)
    model, tokenizer = make_model("gated")
    weights = extract_weights(model)
    lrm = build_replacement(weights, transcoder_weights(load_clt(tmp_path), weights),
                            freeze_prompt(model, tokenize_prompt(tokenizer, PROMPT)))
    assert lrm.has_skip == skip
    graph = attribute(lrm, GraphConfig())
    assert graph.n_selected > 10
    assert_removing_each_source_moves_targets_by_its_edges(model, lrm, graph)


def test_skip_transcoders_with_zero_w_skip_load_without_a_skip_path(tmp_path):
    skip = make_transcoder(0, "skip")
    skip.save_model(tmp_path / "zero" / "layer_0")  # W_skip starts at zero: a plain transcoder
    x = torch.randn(20, TINY.d_model, generator=torch.Generator().manual_seed(4))
    clt = load_clt(tmp_path / "zero")
    assert not clt.config.skip
    with torch.no_grad():
        torch.testing.assert_close(clt.forward(x[:, None])[:, 0], skip(x), rtol=1e-6, atol=1e-6)


def test_transcoders_that_attribution_cannot_use_are_refused(tmp_path):
    make_transcoder(0, hook_in="blocks.0.hook_mlp_in").save_model(tmp_path / "pre_norm" / "layer_0")
    with pytest.raises(CLTFormatError, match="reads 'blocks.0.hook_mlp_in'"):
        load_clt(tmp_path / "pre_norm")
    for layer in (0, 2):
        make_transcoder(layer).save_model(tmp_path / "gap" / f"layer_{layer}")
    with pytest.raises(CLTFormatError, match=r"no transcoder for layers \[1\]"):
        load_clt(tmp_path / "gap")
    for name in ("a", "b"):
        make_transcoder(0).save_model(tmp_path / "twice" / name)
    with pytest.raises(CLTFormatError, match="both transcoders of layer 0"):
        load_clt(tmp_path / "twice")


def test_a_set_of_transcoders_has_a_content_id(tmp_path):
    save_set(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    save_set(tmp_path / "other", kinds=("jumprelu", "jumprelu", "jumprelu"))
    ids = {name: clt_content_id(tmp_path / name) for name in ("a", "copy", "other")}
    assert ids["a"] == ids["copy"] != ids["other"]
    with pytest.raises(CLTFormatError, match="not a CLT directory"):
        clt_content_id(tmp_path)  # holds sets of transcoders, none itself
