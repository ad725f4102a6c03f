"""Feature dashboards on a tiny Llama: planted triggers are found and labelled, the streaming top-k and
statistics equal a brute-force computation, a killed scan resumes to the same tables, and damaged
tables raise clear errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from runtime.checkpoint import CheckpointError
from sparse_attention.data import DataConfig, load_token_blocks
from transcoders import feature_scan
from transcoders.clt import CLTConfig, CrossLayerTranscoder
from transcoders.config import FeaturesConfig
from transcoders.dashboards import build_dashboards
from transcoders.feature_scan import merge_top, scan_activations, window_split
from transcoders.features import FeaturesError, open_features
from transcoders.harvest import harvest_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("private_cache")
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
TRIGGERS = {"q": "u", "x": "y", "z": "a", "j": "s", "k": "m"}  # planted: feature reads key, promotes value


def heldout_blocks(tmp_path: Path, tokenizer) -> torch.Tensor:
    """Held-out blocks from the data module, as the CLT stage gets them."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(12):
        (corpus / f"doc{i}.txt").write_text(f"Document {i}. " + TEXT * 8)
    config = DataConfig(source=str(corpus), context_length=33, heldout_fraction=0.3)
    return load_token_blocks(config, tokenizer).heldout


def random_clt(threshold: float = 0.25, n_features: int = 24) -> CrossLayerTranscoder:
    return CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=32, n_features=n_features, threshold_init=threshold),
                                seed=1)


def planted_clt(model) -> CrossLayerTranscoder:
    """Layer-0 features 0..4 read one letter each (encoder row = the letter's normalised embedding, as the
    layer-0 MLP-input norm sees it) and write the unembedding row of another letter into the last layer."""
    clt = random_clt(threshold=10.0)  # unplanted features stay silent
    embed, unembed = model.model.embed_tokens.weight, model.lm_head.weight
    norm, final_gain = model.model.layers[0].post_attention_layernorm.weight, model.model.norm.weight
    with torch.no_grad():
        clt.W_dec[0].zero_()
        for feature, (reads, writes) in enumerate(TRIGGERS.items()):
            e = embed[ord(reads)]
            direction = norm * e * torch.rsqrt(e.pow(2).mean() + 1e-6)
            clt.W_enc[0, feature] = direction / direction.norm()
            clt.threshold[0, feature] = 4.0  # the letter projects to > 5 on its row, every other token to < 3
            clt.W_dec[0][feature, 1] = unembed[ord(writes)] / final_gain
    return clt


def test_merge_top_keeps_the_k_largest_with_ties_to_the_earlier_token():
    generator = torch.Generator().manual_seed(0)
    F, k, tokens = 5, 4, 60
    stream = torch.randint(0, 4, (tokens, F), generator=generator).float()  # many ties, many zeros
    key, loc = torch.full((F, k), -math.inf), torch.full((F, k), -1, dtype=torch.int64)
    for start in range(0, tokens, 7):
        chunk = stream[start:start + 7]
        token, feature = chunk.nonzero(as_tuple=True)
        key, loc, _ = merge_top(key, loc, feature, chunk[token, feature], start + token)
    for f in range(F):
        active = stream[:, f].nonzero().flatten()
        order = active[torch.argsort(stream[active, f], descending=True, stable=True)][:k]
        assert loc[f, :len(order)].tolist() == order.tolist()
        assert key[f, :len(order)].tolist() == stream[order, f].tolist()


def test_scan_equals_brute_force_over_all_activations(tiny, tmp_path: Path):
    model, tokenizer = tiny
    blocks = heldout_blocks(tmp_path, tokenizer)
    clt = random_clt()
    config = FeaturesConfig(tokens=10_000, top_k=6, n_random=3, random_pool=3, window=7, batch_size=3,
                            precision="fp32")  # compared exactly with an fp32 brute force
    state = scan_activations(model, clt, blocks, config, progress=False)
    T = blocks.shape[1]
    assert state.blocks_done == len(blocks) and state.tokens_done == len(blocks) * (T - 1)
    with torch.no_grad():
        acts = clt.encode(harvest_batch(model, blocks)[0]).view(len(blocks), T - 1, 2, -1)  # [n, T - 1, L, F]
    flat = acts.flatten(0, 1)  # token order = location order
    assert 0.05 < (flat > 0).float().mean() < 0.6  # a test of sparse bookkeeping needs sparse activations
    torch.testing.assert_close(state.count, (flat > 0).sum(0))
    torch.testing.assert_close(state.act_sum, flat.double().sum(0), rtol=1e-9, atol=1e-6)
    before, _ = window_split(config.window)
    padded = torch.nn.functional.pad(acts, (0, 0, 0, 0, before + 1, config.window), value=math.nan)  # pos 0 too
    for layer in range(2):
        for feature in range(clt.n_features):
            values = flat[:, layer, feature]
            order = torch.argsort(values, descending=True, stable=True)[:config.top_k]
            order = order[values[order] > 0]
            expected_loc = (order // (T - 1)) * T + order % (T - 1) + 1
            n = len(order)
            assert state.top_loc[layer, feature, :n].tolist() == expected_loc.tolist()
            assert state.top_act[layer, feature, :n].tolist() == values[order].tolist()
            assert torch.all(state.top_act[layer, feature, n:] == -math.inf)
            for slot, loc in enumerate(expected_loc.tolist()):  # the window: the feature's acts around the token
                block, position = divmod(loc, T)
                window = padded[block, position: position + config.window, layer, feature]
                torch.testing.assert_close(state.top_window[layer, feature, slot], window, equal_nan=True)
            sampled = state.pool_loc[layer, feature][state.pool_key[layer, feature] > -math.inf]
            assert len(sampled) == min(int((values > 0).sum()), 9)  # a sample of the active tokens, no repeats
            assert len(set(sampled.tolist())) == len(sampled)
            for loc, act in zip(sampled.tolist(), state.pool_act[layer, feature].tolist()):
                block, position = divmod(loc, T)
                assert act == acts[block, position - 1, layer, feature] > 0


def test_planted_triggers_are_the_top_contexts_and_the_labels(tiny, tmp_path: Path):
    model, tokenizer = tiny
    blocks = heldout_blocks(tmp_path, tokenizer)
    clt = planted_clt(model)
    config = FeaturesConfig(top_k=5, n_random=3, window=9, batch_size=4)
    meta = build_dashboards(model, clt, tokenizer, blocks, config, tmp_path / "clt", progress=False)
    assert meta["tokens_scanned"] == len(blocks) * (blocks.shape[1] - 1)
    dashboards = open_features(tmp_path / "clt")
    table = dashboards.features().set_index(["layer", "feature"])
    labels = dashboards.labels()
    for feature, (reads, writes) in enumerate(TRIGGERS.items()):
        top = dashboards.examples(0, feature, "top")
        assert len(top) == 5 and top["rank"].tolist() == list(range(5))
        for row in top.itertuples():
            assert row.token_strings[row.window_index] == reads  # the max sits on the planted letter
            assert row.activations[row.window_index] == pytest.approx(row.activation)
            assert len(row.tokens) == len(row.token_strings) == len(row.activations) <= 9
            assert row.tokens.tolist() == blocks[row.block, row.position - row.window_index:][:len(row.tokens)].tolist()
        random = dashboards.examples(0, feature, "random")
        assert len(random) == 3 and random["activation"].is_monotonic_increasing  # spread low to high
        assert all(r.token_strings[r.window_index] == reads for r in random.itertuples())
        row = table.loc[(0, feature)]
        occurrences = int((blocks[:, 1:] == ord(reads)).sum())
        assert row["n_active"] == occurrences and row["density"] == occurrences / meta["tokens_scanned"]
        assert row["input_tokens"][0] == reads and row["promoted_tokens"][0] == writes
        assert labels[(0, feature)] == f'"{reads}" → "{writes}", "{row["promoted_tokens"][1]}"'
        assert row["label_source"] == "auto"
    silent = table.loc[(1, 0)]
    assert silent["n_active"] == 0 and pd.isna(silent["mean_activation"]) and silent["max_activation"] == 0
    assert labels[(1, 0)].startswith("inactive; reads ")
    assert dashboards.examples(1, 0).empty


def test_a_killed_scan_resumes_to_the_same_tables(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model, tokenizer = tiny
    blocks = heldout_blocks(tmp_path, tokenizer)
    clt = random_clt()
    config = FeaturesConfig(top_k=4, n_random=2, window=6, batch_size=2, checkpoint_tokens=120)
    build_dashboards(model, clt, tokenizer, blocks, config, tmp_path / "whole", progress=False)

    calls = []

    def harvest_then_die(model, tokens):
        if len(calls) == 5:  # after 5 batches of 64 tokens; the last save was at 256, batch 5 is redone
            raise KeyboardInterrupt
        calls.append(len(tokens))
        return harvest_batch(model, tokens)

    monkeypatch.setattr(feature_scan, "harvest_batch", harvest_then_die)
    with pytest.raises(KeyboardInterrupt):
        build_dashboards(model, clt, tokenizer, blocks, config, tmp_path / "killed", progress=False)
    state = torch.load(tmp_path / "killed" / "features" / "scan_state.pt", weights_only=False)
    assert state["tokens_done"] == 256 and not (tmp_path / "killed" / "features" / "features.json").exists()
    monkeypatch.setattr(feature_scan, "harvest_batch", harvest_batch)
    with pytest.raises(CheckpointError, match="different feature scan config"):  # never mixes two configs
        build_dashboards(model, clt, tokenizer, blocks, config.model_copy(update={"top_k": 5}), tmp_path / "killed",
                         progress=False)
    resumed = build_dashboards(model, clt, tokenizer, blocks, config, tmp_path / "killed", progress=False)
    assert not (tmp_path / "killed" / "features" / "scan_state.pt").exists()
    whole, again = open_features(tmp_path / "whole"), open_features(tmp_path / "killed")
    pd.testing.assert_frame_equal(whole.features(), again.features())
    pd.testing.assert_frame_equal(whole.examples(), again.examples())
    assert resumed["fingerprint"] == whole.meta["fingerprint"]
    assert whole.examples()["kind"].value_counts().to_dict() == {"top": 4 * 48, "random": 2 * 48}


def test_missing_or_corrupted_tables_raise_clear_errors(tiny, tmp_path: Path):
    model, tokenizer = tiny
    with pytest.raises(FeaturesError, match="no finished feature dashboards"):
        open_features(tmp_path / "clt")
    blocks = heldout_blocks(tmp_path, tokenizer)
    config = FeaturesConfig(top_k=2, n_random=0, tokens=200)  # no random contexts: only top ones
    build_dashboards(model, random_clt(), tokenizer, blocks, config, tmp_path / "clt", progress=False)
    directory = tmp_path / "clt" / "features"
    dashboards = open_features(tmp_path / "clt")
    assert set(dashboards.examples()["kind"]) == {"top"}
    (directory / "feature_examples.parquet").write_bytes(b"not parquet at all")
    assert len(dashboards.labels()) == 48  # the features table is intact
    with pytest.raises(FeaturesError, match="feature_examples.parquet is corrupted"):
        dashboards.examples(0, 0)
    (directory / "feature_examples.parquet").write_bytes((directory / "features.parquet").read_bytes())
    with pytest.raises(FeaturesError, match="not the feature_examples.parquet schema"):
        dashboards.examples()
    (directory / "features.parquet").unlink()
    with pytest.raises(FeaturesError, match="features.parquet is missing"):
        dashboards.labels()
    (directory / "features.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(FeaturesError, match="features.json is corrupted"):
        open_features(tmp_path / "clt")
