"""sae-lens transcoders as the CLT of attribution: one per-layer transcoder per MLP, same-layer decoders only.

A directory of sae-lens transcoders, one sub-directory per layer as sae-lens' `save_model` writes them
(`cfg.json` + `sae_weights.safetensors`; the directory itself may be one, for a one-layer model), loads
through sae-lens' own `SAE.load_from_disk` into a CrossLayerTranscoder whose layer-l features write only to
MLP output l (W_dec[l][:, 0]; the decoders into later layers are zero). It holds L(L+1)/2 decoder blocks of
[F, d] rather than L, so a set of wide transcoders takes about (L+1)/2 times its own size in memory.

What is exact, and so accepted:
- `Transcoder` (ReLU: threshold 0) and `JumpReLUTranscoder`, whose activation relu(pre) * (pre > t) is
  pre * (pre > max(t, 0)): the CLT's JumpReLU with the threshold clamped at 0;
- their skip variants (`SkipTranscoder`, `JumpReLUSkipTranscoder`): W_skip [d_out, d_in] becomes the CLT's
  skip path of that layer (W_skip[l] = W_skip.T; layers without one get zero), which attribution treats as one
  more linear path; a set whose W_skip are all zero loads without a skip path;
- reading the MLP input after its norm (`blocks.{l}.ln2.hook_normalized`, TransformerLens'
  `blocks.{l}.mlp.hook_in`) and writing the MLP output (`blocks.{l}.hook_mlp_out` / `blocks.{l}.mlp.hook_out`),
  layer l taken from the hook name in `cfg.json`'s metadata; `normalize_activations="none"`.
Refused with CLTFormatError: other hooks, activation normalisation, transcoders of different widths, and
missing or repeated layers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from transcoders.clt import CLTConfig, CLTFormatError, CrossLayerTranscoder

SAE_LENS_CONFIG = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
INPUT_HOOK = re.compile(r"^blocks\.(\d+)\.(?:ln2\.hook_normalized|mlp\.hook_in)$")
OUTPUT_HOOK = re.compile(r"^blocks\.(\d+)\.(?:hook_mlp_out|mlp\.hook_out)$")


def transcoder_dirs(directory: Path) -> list[Path]:
    """The sae-lens transcoders in `directory`: itself if it holds a cfg.json, else its sub-directories that do."""
    if (directory / SAE_LENS_CONFIG).is_file():
        return [directory]
    return sorted(p for p in directory.iterdir() if (p / SAE_LENS_CONFIG).is_file()) if directory.is_dir() else []


def transcoder_content_files(directory: Path) -> list[str]:
    """The files (relative to `directory`) that define its sae-lens transcoders: each one's cfg.json and
    weights, the content behind the CLT id of attribution's graph ids."""
    return sorted(str(path.relative_to(directory)) for sub in transcoder_dirs(directory)
                  for path in sub.iterdir() if path.name == SAE_LENS_CONFIG or path.suffix == ".safetensors")


def _layer_of(path: Path, sae) -> int:
    metadata = sae.cfg.metadata
    hook_in, hook_out = metadata.hook_name, metadata.hook_name_out
    match = INPUT_HOOK.match(hook_in or "")
    if match is None:
        raise CLTFormatError(
            f"{path}: the transcoder reads {hook_in!r}; attribution needs transcoders that read the MLP input after "
            "its norm, 'blocks.{layer}.ln2.hook_normalized' (TransformerLens' 'blocks.{layer}.mlp.hook_in'): set "
            "cfg.metadata.hook_name")
    layer = int(match.group(1))
    out = OUTPUT_HOOK.match(hook_out or f"blocks.{layer}.hook_mlp_out")
    if out is None or int(out.group(1)) != layer:
        raise CLTFormatError(f"{path}: the transcoder writes {hook_out!r}; attribution needs the MLP output of the "
                             f"layer it reads, 'blocks.{layer}.hook_mlp_out'")
    return layer


def _check_exact(path: Path, sae) -> None:
    from sae_lens import JumpReLUTranscoder, SkipTranscoder, Transcoder

    if type(sae) not in (Transcoder, JumpReLUTranscoder) and not isinstance(sae, SkipTranscoder):
        raise CLTFormatError(f"{path} holds a sae-lens {type(sae).__name__}, not a ReLU or JumpReLU transcoder")
    if sae.cfg.normalize_activations != "none" or sae.cfg.reshape_activations != "none":
        raise CLTFormatError(f"{path}: normalize_activations={sae.cfg.normalize_activations!r}, reshape_activations="
                             f"{sae.cfg.reshape_activations!r}; only 'none' is exact (fold the normalisation first)")


def _skip_weight(sae) -> torch.Tensor | None:
    """A skip transcoder's nonzero W_skip [d_out, d_in], else None."""
    from sae_lens import SkipTranscoder

    return sae.W_skip if isinstance(sae, SkipTranscoder) and bool((sae.W_skip != 0).any()) else None


def load_sae_lens_transcoders(directory: str | Path) -> CrossLayerTranscoder:
    """Per-layer sae-lens transcoders in `directory` (see the module docstring) as an eval-mode CLT."""
    from sae_lens import SAE, JumpReLUTranscoder  # slow import: only when such a directory is loaded

    directory = Path(directory)
    paths = transcoder_dirs(directory)
    if not paths:
        raise CLTFormatError(f"{directory} holds no sae-lens transcoder ({SAE_LENS_CONFIG} in it or its sub-directories)")
    by_layer: dict[int, tuple[Path, object]] = {}
    for path in paths:
        try:
            sae = SAE.load_from_disk(path, device="cpu", dtype="float32")
        except Exception as exc:  # sae-lens raises several types for bad configs and weights
            raise CLTFormatError(f"{path} is not a readable sae-lens transcoder ({exc})") from exc
        _check_exact(path, sae)
        layer = _layer_of(path, sae)
        if layer in by_layer:
            raise CLTFormatError(f"{path} and {by_layer[layer][0]} are both transcoders of layer {layer}")
        by_layer[layer] = (path, sae)
    n_layers = max(by_layer) + 1
    missing = sorted(set(range(n_layers)) - set(by_layer))
    if missing:
        raise CLTFormatError(f"{directory} has no transcoder for layers {missing}; every MLP needs one")
    shapes = {(sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out) for _, sae in by_layer.values()}
    d_model, n_features, d_out = next(iter(shapes))
    if len(shapes) > 1 or d_out != d_model:
        raise CLTFormatError(f"{directory}: transcoders of (d_in, d_sae, d_out) {sorted(shapes)}; a CLT needs one "
                             "width and d_in == d_out")
    skips = {layer: _skip_weight(sae) for layer, (_, sae) in by_layer.items()}
    skip = any(weight is not None for weight in skips.values())
    config = CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, threshold_init=0.0, skip=skip)
    clt = CrossLayerTranscoder(config, init=False)
    with torch.no_grad():
        for weight in clt.W_dec:
            weight.zero_()
        if skip:
            clt.W_skip.zero_()
            for layer, weight in skips.items():
                if weight is not None:
                    clt.W_skip[layer].copy_(weight.T)  # sae-lens: skip = x @ W_skip.T, W_skip [d_out, d_in]
        for layer, (_, sae) in by_layer.items():
            clt.W_enc[layer].copy_(sae.W_enc.T)  # sae-lens: pre = x @ W_enc [d_in, d_sae] + b_enc
            clt.b_enc[layer].copy_(sae.b_enc)
            threshold = sae.threshold if isinstance(sae, JumpReLUTranscoder) else torch.zeros(n_features)
            clt.threshold[layer].copy_(threshold.clamp(min=0.0))  # relu(pre) * (pre > t) = pre * (pre > max(t, 0))
            clt.W_dec[layer][:, 0].copy_(sae.W_dec)  # [d_sae, d_out]: to this layer's MLP output only
            clt.b_dec[layer].copy_(sae.b_dec)
    return clt.eval()
