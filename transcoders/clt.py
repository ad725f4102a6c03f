"""The cross-layer transcoder (CLT): per source layer an encoder, and a decoder into every later layer.

Features of layer l read the MLP input of layer l (after the pre-MLP RMSNorm, gain included) and
write into the MLP outputs of layers l..L-1; the reconstruction of MLP output t sums the decoders of
all source layers s <= t, plus b_dec[t]. The activation is JumpReLU with a per-feature threshold
stored directly in fp32: `act = pre * (pre > threshold)`, as circuit-tracer computes it. With
`skip=True` each layer also has a linear skip path (a skip transcoder's): MLP output l gets
`mlp_in[l] @ W_skip[l]` ([d_in, d_out], circuit-tracer's orientation) beside the features' writes.

Training works in normalised units: each layer's input and output are divided by a scalar
(`input_scale`, `output_scale`, buffers that default to 1). The module always takes and returns
real (un-normalised) activations; `fold_normalisation()` moves the scales into the weights, after
which the parameters are in real units and the scales are 1. `save_clt` writes folded weights in
circuit-tracer's layout (per source layer `W_enc_{i}.safetensors` and `W_dec_{i}.safetensors`, plus
`config.yaml`; a skip path as `W_skip_{i}.safetensors`) and `load_clt` reads it back.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.files import files_sha256, write_atomic, write_json_atomic, write_text_atomic
from transcoders.decode import decode_dense, decode_with_norms, decoder_norms, sparse_decode
from transcoders.jumprelu import jumprelu, jumprelu_forward

FORMAT_VERSION = 1
META_FILE = "clt.json"  # ours: config, file sizes, training metadata; never matches circuit-tracer's W_enc_* glob
CT_CONFIG_FILE = "config.yaml"  # circuit-tracer's
FEATURE_INPUT_HOOK = "mlp.hook_in"  # after post_attention_layernorm, gain included: what harvest.py records
FEATURE_OUTPUT_HOOK = "hook_mlp_out"


class CLTFormatError(ValueError):
    """A CLT directory that is missing, partial, corrupted or inconsistent; the message says which file."""


class CLTConfig(BaseModel):
    """Shape and activation of a CLT; `n_features` is per layer."""

    model_config = ConfigDict(extra="forbid")

    n_layers: PositiveInt
    d_model: PositiveInt
    n_features: PositiveInt
    threshold_init: float = Field(0.03, ge=0, description="initial JumpReLU threshold of every feature")
    bandwidth: float = Field(1.0, gt=0, description="width of the rectangle kernel in the threshold gradient")
    skip: bool = Field(False, description="a linear skip path per layer, MLP input -> MLP output (W_skip [L, D, D])")

    @property
    def n_parameters(self) -> int:
        """Encoders, biases, thresholds, decoders (about (n_layers + L(L+1)/2) * F * d_model) and skip paths."""
        L, F, D = self.n_layers, self.n_features, self.d_model
        return L * F * D + 2 * L * F + F * D * L * (L + 1) // 2 + L * D + (L * D * D if self.skip else 0)


class CrossLayerTranscoder(nn.Module):
    """A CLT with JumpReLU features; see the module docstring for units and shapes."""

    def __init__(self, config: CLTConfig, *, seed: int = 0, init: bool = True):
        super().__init__()
        self.config = config
        L, F, D = config.n_layers, config.n_features, config.d_model
        self.W_enc = nn.Parameter(torch.empty(L, F, D))  # [layer, feature, d_model], row = encoder
        self.b_enc = nn.Parameter(torch.zeros(L, F))
        self.threshold = nn.Parameter(torch.full((L, F), float(config.threshold_init)))
        self.W_dec = nn.ParameterList(nn.Parameter(torch.empty(F, L - s, D)) for s in range(L))
        self.b_dec = nn.Parameter(torch.zeros(L, D))
        # [layer, d_in, d_out]: MLP-out[l] += mlp_in[l] @ W_skip[l] (training units); None without a skip path
        self.W_skip = nn.Parameter(torch.zeros(L, D, D)) if config.skip else None
        self.register_buffer("input_scale", torch.ones(L))  # [layer] real = normalised * scale
        self.register_buffer("output_scale", torch.ones(L))
        if init:
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Uniform init (our choice): encoders in +-1/sqrt(F), decoders in +-1/sqrt(L * D), biases and skip 0."""
        generator = torch.Generator().manual_seed(seed)
        L, F, D = self.config.n_layers, self.config.n_features, self.config.d_model
        enc_bound, dec_bound = 1 / math.sqrt(F), 1 / math.sqrt(L * D)
        self.W_enc.uniform_(-enc_bound, enc_bound, generator=generator)
        for weight in self.W_dec:
            weight.uniform_(-dec_bound, dec_bound, generator=generator)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self.threshold.fill_(self.config.threshold_init)
        if self.W_skip is not None:
            self.W_skip.zero_()

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def n_features(self) -> int:
        return self.config.n_features

    @property
    def d_model(self) -> int:
        return self.config.d_model

    def pre_activations(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """[..., L, D] real MLP inputs -> [..., L, F] pre-activations (stored layer-major underneath), float32
        also under bf16 autocast: the JumpReLU threshold compares and learns in fp32."""
        lead, (L, D) = mlp_in.shape[:-2], mlp_in.shape[-2:]
        x = (mlp_in / self.input_scale[:, None]).reshape(-1, L, D).transpose(0, 1)  # [L, N, D]
        pre = torch.baddbmm(self.b_enc[:, None, :], x, self.W_enc.transpose(1, 2)).float()  # [L, N, F]
        return pre.transpose(0, 1).reshape(*lead, L, self.n_features)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Pre-activations [..., L, F] -> activations [..., L, F]: JumpReLU with this CLT's thresholds
        (thresholds learn through the straight-through estimator of transcoders/jumprelu.py)."""
        return jumprelu(pre, self.threshold, self.config.bandwidth)

    def encode(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """[..., L, D] -> JumpReLU activations [..., L, F]."""
        return self.activation(self.pre_activations(mlp_in))

    def _decode_with(self, decoder, acts: torch.Tensor) -> torch.Tensor:
        lead, (L, F) = acts.shape[:-2], acts.shape[-2:]
        out = decoder(acts.reshape(-1, L, F), list(self.W_dec)) + self.b_dec  # [N, L, D] normalised
        return (out * self.output_scale[:, None]).reshape(*lead, L, self.d_model)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """[..., L, F] activations -> [..., L, D] reconstructed MLP outputs (with b_dec), sparse path."""
        return self._decode_with(sparse_decode, acts)

    def decode_dense(self, acts: torch.Tensor) -> torch.Tensor:
        """Reference for `decode`: the same map with plain dense matmuls."""
        return self._decode_with(decode_dense, acts)

    def decode_with_norms(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`decode(acts)`, `decoder_norms()`) from one sparse Function, as the training loss wants them."""
        lead, (L, F) = acts.shape[:-2], acts.shape[-2:]
        out, norms = decode_with_norms(acts.reshape(-1, L, F), list(self.W_dec))
        out = (out + self.b_dec) * self.output_scale[:, None]
        return out.reshape(*lead, L, self.d_model), norms

    def skip_output(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """[..., L, D] real MLP inputs -> [..., L, D] what the skip paths add to the MLP outputs (real units)."""
        if self.W_skip is None:
            raise ValueError("this CLT has no skip path (CLTConfig.skip is False)")
        lead, (L, D) = mlp_in.shape[:-2], mlp_in.shape[-2:]
        x = (mlp_in / self.input_scale[:, None]).reshape(-1, L, D).transpose(0, 1)  # [L, N, D]
        out = torch.bmm(x, self.W_skip) * self.output_scale[:, None, None]  # [L, N, D]
        return out.transpose(0, 1).reshape(*lead, L, D)

    def skip_layer(self, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
        """One layer's skip output from its real MLP input: [..., D] -> [..., D]."""
        if self.W_skip is None:
            raise ValueError("this CLT has no skip path (CLTConfig.skip is False)")
        return (mlp_in / self.input_scale[layer]) @ self.W_skip[layer] * self.output_scale[layer]

    def forward(self, mlp_in: torch.Tensor) -> torch.Tensor:
        """[..., L, D] MLP inputs -> [..., L, D] reconstructed MLP outputs (features' writes, b_dec, skip)."""
        out = self.decode(self.encode(mlp_in))
        return out if self.W_skip is None else out + self.skip_output(mlp_in)

    def encode_layer(self, layer: int, mlp_in: torch.Tensor) -> torch.Tensor:
        """One layer's features from its MLP input: [..., D] -> [..., F]."""
        pre = ((mlp_in / self.input_scale[layer]) @ self.W_enc[layer].T).float() + self.b_enc[layer]
        return jumprelu(pre, self.threshold[layer], self.config.bandwidth)

    def decode_layer(self, layer: int, acts: list[torch.Tensor]) -> torch.Tensor:
        """Reconstruct MLP output `layer` from `acts[s]` [..., F] of source layers s = 0..layer -> [..., D]."""
        if len(acts) != layer + 1:
            raise ValueError(f"decode_layer({layer}) needs activations of {layer + 1} source layers, got {len(acts)}")
        out = self.b_dec[layer]
        for source, source_acts in enumerate(acts):
            out = out + source_acts @ self.W_dec[source][:, layer - source]
        return out * self.output_scale[layer]

    def decoder_norms(self) -> torch.Tensor:
        """[L, F]: each feature's decoder norm over all the layers it writes to (in training units)."""
        return decoder_norms(list(self.W_dec))

    @torch.no_grad()
    def fold_normalisation(self) -> CrossLayerTranscoder:
        """Move input/output scales into the weights (outputs unchanged); afterwards the scales are 1."""
        self.W_enc.div_(self.input_scale[:, None, None])
        for source, weight in enumerate(self.W_dec):
            weight.mul_(self.output_scale[source:, None])
        self.b_dec.mul_(self.output_scale[:, None])
        if self.W_skip is not None:
            self.W_skip.mul_((self.output_scale / self.input_scale)[:, None, None])
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)
        return self

    @torch.no_grad()
    def folded_encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc [L, F, D], b_enc [L, F]) in real units, float32, detached: pre = W_enc[l] . mlp_in[l] + b_enc[l].
        When the input scales are 1 (as after `fold_normalisation` or `load_clt`) these share this CLT's storage."""
        W_enc, b_enc, scale = self.W_enc.detach().float(), self.b_enc.detach().float(), self.input_scale.float()
        if not bool((scale == 1).all()):
            W_enc = W_enc / scale[:, None, None]
        return W_enc, b_enc

    @torch.no_grad()
    def folded_decoder(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(W_dec: per source layer s [F, L - s, D], b_dec [L, D]) in real units, float32, detached; [f, k] of
        W_dec[s] writes to MLP output s + k. Shares this CLT's storage when the output scales are 1."""
        W_dec, b_dec, scale = [w.detach().float() for w in self.W_dec], self.b_dec.detach().float(), self.output_scale.float()
        if not bool((scale == 1).all()):
            W_dec = [w * scale[source:, None] for source, w in enumerate(W_dec)]
            b_dec = b_dec * scale[:, None]
        return tuple(W_dec), b_dec

    @torch.no_grad()
    def folded_skip(self) -> torch.Tensor | None:
        """W_skip [L, d_in, d_out] in real units, float32, detached (MLP-out[l] += mlp_in[l] @ W_skip[l]), or
        None without a skip path."""
        if self.W_skip is None:
            return None
        W_skip, ratio = self.W_skip.detach().float(), (self.output_scale / self.input_scale).float()
        return W_skip if bool((ratio == 1).all()) else W_skip * ratio[:, None, None]

    def frozen_activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The value of `activation` as a function of float32 pre-activations [..., L, F] alone, with a copy
        of today's thresholds and no gradient: what a frozen snapshot of this CLT applies."""
        return functools.partial(jumprelu_forward, threshold=self.threshold.detach().float().clone())

    @torch.no_grad()
    def folded_layer(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s tensors in real units, named as circuit-tracer names them (no copy of the whole CLT)."""
        s_in, s_out = self.input_scale, self.output_scale
        return {
            f"W_enc_{layer}": (self.W_enc[layer] / s_in[layer]).float().contiguous(),
            f"b_enc_{layer}": self.b_enc[layer].float().contiguous(),
            f"b_dec_{layer}": (self.b_dec[layer] * s_out[layer]).float().contiguous(),
            f"threshold_{layer}": self.threshold[layer].float().contiguous(),
            f"W_dec_{layer}": (self.W_dec[layer] * s_out[layer:, None]).float().contiguous(),
            **({} if self.W_skip is None else
               {f"W_skip_{layer}": (self.W_skip[layer] * (s_out[layer] / s_in[layer])).float().contiguous()}),
        }


def _layer_files(directory: Path, prefix: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{prefix}_(\d+)\.safetensors$")
    return {int(m.group(1)): p for p in directory.iterdir() if (m := pattern.match(p.name))}


def save_clt(clt: CrossLayerTranscoder, directory: str | Path, extra: dict | None = None,
             *, model_name: str | None = None) -> None:
    """Write `clt` in circuit-tracer's layout (folded into real units; `clt` itself is not changed).

    Files: W_enc_{i}.safetensors (W_enc_i [F, D], b_enc_i [F], b_dec_i [D], threshold_i [F]),
    W_dec_{i}.safetensors (W_dec_i [F, L - i, D]), with a skip path W_skip_{i}.safetensors (W_skip_i [D, D],
    input x output; circuit-tracer's file loader does not read it), config.yaml, and our clt.json (config,
    file sizes, `extra`), written last: a directory without a matching clt.json is an unfinished save.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    for prefix in ("W_enc", "W_dec", "W_skip"):  # a previous, deeper CLT must not leave files circuit-tracer would count
        for index, path in _layer_files(directory, prefix).items():
            if index >= clt.n_layers or (prefix == "W_skip" and clt.W_skip is None):
                path.unlink()
    sizes = {}
    for layer in range(clt.n_layers):
        tensors = clt.folded_layer(layer)
        files = [(f"W_dec_{layer}.safetensors", {f"W_dec_{layer}": tensors.pop(f"W_dec_{layer}")})]
        if clt.W_skip is not None:
            files.append((f"W_skip_{layer}.safetensors", {f"W_skip_{layer}": tensors.pop(f"W_skip_{layer}")}))
        for name, payload in [(f"W_enc_{layer}.safetensors", tensors), *files]:
            write_atomic(directory / name, lambda tmp, payload=payload: save_file(payload, str(tmp)))
            sizes[name] = (directory / name).stat().st_size
    ct_config = {"model_kind": "cross_layer_transcoder", "feature_input_hook": FEATURE_INPUT_HOOK,
                 "feature_output_hook": FEATURE_OUTPUT_HOOK}
    if model_name is not None:
        ct_config["model_name"] = model_name
    write_text_atomic(directory / CT_CONFIG_FILE, yaml.safe_dump(ct_config, sort_keys=False))
    meta = {"format_version": FORMAT_VERSION, "clt_config": clt.config.model_dump(), "files": sizes,
            "extra": extra or {}}
    write_json_atomic(directory / META_FILE, meta)


def _read_meta(directory: Path) -> dict | None:
    path = directory / META_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        CLTConfig.model_validate(meta["clt_config"])
        if meta["format_version"] != FORMAT_VERSION:
            raise ValueError(f"format_version {meta['format_version']}, this code reads {FORMAT_VERSION}")
        return meta
    except (ValueError, KeyError, TypeError) as exc:
        raise CLTFormatError(f"{path} is corrupted ({exc}); re-export the CLT") from exc


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated or garbled files
        raise CLTFormatError(f"{path} is unreadable ({exc}); the CLT is corrupted, re-export it") from exc


def _expect(path: Path, tensors: dict, name: str, shape: tuple[int, ...], optional: bool = False) -> torch.Tensor | None:
    if name not in tensors:
        if optional:
            return None
        raise CLTFormatError(f"{path} has no tensor {name!r} (found {sorted(tensors)}); not a CLT layer file")
    tensor = tensors[name]
    if tuple(tensor.shape) != shape:
        raise CLTFormatError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if not torch.isfinite(tensor).all():
        raise CLTFormatError(f"{path}: {name} holds NaN or inf values; the CLT is corrupted")
    return tensor.float()


def load_clt(directory: str | Path) -> CrossLayerTranscoder:
    """Read a CLT in circuit-tracer's layout (ours or anyone's) into an eval-mode CrossLayerTranscoder.

    A layer file without threshold_i (circuit-tracer's ReLU CLTs) gets threshold 0, which is ReLU.
    Missing, truncated, mis-shaped or non-finite files raise CLTFormatError naming the file.
    A directory of sae-lens transcoders (no W_enc_* files) loads through transcoders/sae_lens_transcoders.py.
    The CLT has a skip path when clt.json says so, or, without clt.json, when W_skip_* files are present.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CLTFormatError(f"CLT directory {directory} does not exist; train or export a CLT there first")
    meta = _read_meta(directory)
    enc_files, dec_files = _layer_files(directory, "W_enc"), _layer_files(directory, "W_dec")
    if not enc_files and meta is None:
        # here, not at the top: that module imports this one
        from transcoders.sae_lens_transcoders import load_sae_lens_transcoders, transcoder_dirs

        if transcoder_dirs(directory):
            return load_sae_lens_transcoders(directory)
    if not enc_files:
        raise CLTFormatError(f"{directory} holds no W_enc_*.safetensors: not a CLT directory")
    skip_files = _layer_files(directory, "W_skip")
    n_layers = meta["clt_config"]["n_layers"] if meta else max(enc_files) + 1
    skip = meta["clt_config"].get("skip", False) if meta else bool(skip_files)
    prefixes = ("W_enc", "W_dec", "W_skip") if skip else ("W_enc", "W_dec")
    expected = [f"{p}_{i}.safetensors" for i in range(n_layers) for p in prefixes]
    present = {p.name for p in [*enc_files.values(), *dec_files.values(), *skip_files.values()]}
    missing = [name for name in expected if name not in present]
    if missing:
        raise CLTFormatError(f"{directory} is a partial CLT: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if meta:
        for name, size in meta["files"].items():
            actual = (directory / name).stat().st_size
            if actual != size:
                raise CLTFormatError(f"{directory / name} has {actual} bytes, {META_FILE} recorded {size}: corrupted")
    first = _read_tensors(enc_files[0])
    if "W_enc_0" not in first or first["W_enc_0"].ndim != 2:
        raise CLTFormatError(f"{enc_files[0]} has no 2-d tensor 'W_enc_0'; not a CLT layer file")
    n_features, d_model = first["W_enc_0"].shape
    options = {k: meta["clt_config"][k] for k in ("threshold_init", "bandwidth")} if meta else {}
    if meta and (meta["clt_config"]["n_features"], meta["clt_config"]["d_model"]) != (n_features, d_model):
        raise CLTFormatError(f"{enc_files[0]}: W_enc_0 is {n_features}x{d_model}, {META_FILE} says otherwise")
    config = CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, skip=skip, **options)
    clt = CrossLayerTranscoder(config, init=False)
    with torch.no_grad():
        for layer in range(n_layers):
            path = enc_files[layer]
            enc = first if layer == 0 else _read_tensors(path)
            clt.W_enc[layer].copy_(_expect(path, enc, f"W_enc_{layer}", (n_features, d_model)))
            clt.b_enc[layer].copy_(_expect(path, enc, f"b_enc_{layer}", (n_features,)))
            clt.b_dec[layer].copy_(_expect(path, enc, f"b_dec_{layer}", (d_model,)))
            threshold = _expect(path, enc, f"threshold_{layer}", (n_features,), optional=True)
            clt.threshold[layer].copy_(threshold if threshold is not None else torch.zeros(n_features))
            path = dec_files[layer]
            dec = _read_tensors(path)
            clt.W_dec[layer].copy_(_expect(path, dec, f"W_dec_{layer}", (n_features, n_layers - layer, d_model)))
            if skip:
                path = skip_files[layer]
                clt.W_skip[layer].copy_(_expect(path, _read_tensors(path), f"W_skip_{layer}", (d_model, d_model)))
    return clt.eval()


def clt_content_id(directory: str | Path) -> str:
    """sha256 of a CLT's layer files (W_enc_*, W_dec_*: every weight attribution reads; for a directory of
    sae-lens transcoders, each one's cfg.json and weights), by content only: a copy of the directory has the
    same id, a retrained CLT another."""
    directory = Path(directory)
    names = sorted(p.name for prefix in ("W_enc", "W_dec") for p in _layer_files(directory, prefix).values())
    if not names and _read_meta(directory) is None:
        # here, not at the top: that module imports this one
        from transcoders.sae_lens_transcoders import transcoder_content_files

        names = transcoder_content_files(directory)
    if not names:
        raise CLTFormatError(f"{directory} holds no W_enc_*.safetensors: not a CLT directory")
    return files_sha256(directory, names)


def load_clt_metadata(directory: str | Path) -> dict:
    """The `extra` dict save_clt recorded (training metadata), or {} for a CLT exported elsewhere."""
    meta = _read_meta(Path(directory))
    return meta["extra"] if meta else {}
