"""Named places in a causal LM, as TransformerLens names them: one name per place, used everywhere.

Hook points (l = layer; every tensor is [batch, pos, ...]):

| name                             | the tensor                                                         |
|----------------------------------|--------------------------------------------------------------------|
| `hook_embed`                     | token embeddings [.., d_model]                                     |
| `blocks.{l}.hook_resid_pre`      | the residual stream entering layer l                               |
| `blocks.{l}.ln1.hook_normalized` | the attention input: resid_pre after the pre-attention norm (gain included) |
| `blocks.{l}.attn.hook_q/k/v`     | query / key / value projections before RoPE [.., heads * d_head]   |
| `blocks.{l}.attn.hook_z`         | the attention-weighted values of every head, input of the output projection [.., n_heads * d_head] |
| `blocks.{l}.hook_attn_out`       | the attention output added to the residual stream                  |
| `blocks.{l}.hook_resid_mid`      | resid_pre + attn_out, input of the pre-MLP norm                    |
| `blocks.{l}.ln2.hook_normalized` | the MLP input after the pre-MLP norm (TransformerLens' `blocks.{l}.mlp.hook_in`) |
| `blocks.{l}.hook_mlp_out`        | the MLP output added to the residual stream                        |
| `hook_resid_final`               | the residual stream after the last layer, input of the final norm  |
| `ln_final.hook_normalized`       | the final norm's output, what the unembedding reads                |

Reader inputs (TransformerLens' `use_split_qkv_input` / `use_hook_mlp_in` points): what one reader
reads. Read, they equal resid_pre (once per head) and resid_mid; a replacement changes only that
reader's input, never the residual stream. `hook_names` lists every tensor once, so not these.

| name                             | the tensor                                                         |
|----------------------------------|--------------------------------------------------------------------|
| `blocks.{l}.hook_q_input`        | resid_pre once per head of the q projection [.., heads, d_model]; a replacement x gives head h the query W_h ln1(x_h) |
| `blocks.{l}.hook_k/v_input`      | the same for the k / v projection (one entry per key-value head)   |
| `blocks.{l}.hook_mlp_in`         | the MLP's input before the pre-MLP norm (resid_mid)                |

(Replacing `hook_resid_mid` changes only the MLP's input too: the decoder layer keeps its own reference
to the residual. `hook_mlp_in` is the name that says so.)

`hooks(model, {name: fn})` attaches functions while a `with` block runs and always removes them. A
function gets the tensor and returns None (it only reads) or a new tensor that replaces it downstream
(never write into the split inputs: they are broadcast views of one residual). A split input's function may
return `HeadInputs` instead: new inputs for some heads, the others reading the residual. A replaced split
input's projection runs once: per head from the new inputs (shared for the heads `HeadInputs` leaves out).
Modules have names too (`embed`, `blocks`, `blocks.{l}.ln2`, `ln_final`, `rotary`, ...) for code that
reads weights (`module(model, name)`) or swaps a module (`replace_module`). The per-family part (module
paths, and which modules a family lacks) is sparse_attention/architectures.py; where a family has a norm
on the attention or MLP output, `hook_attn_out` / `hook_mlp_out` are that norm's output (what is added
to the residual), and where it has no pre-attention / pre-MLP norm, `ln1/ln2.hook_normalized` are the
un-normed inputs. A GatedModel's active gate context (sparse_attention.gated_attention) is how its
forward reaches the attention function, not a hook point.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparse_attention.architectures import Architecture, ArchitectureError, architecture
from sparse_attention.gated_attention import GatedModel

HookFn = Callable[[torch.Tensor], torch.Tensor | None]
Side = Literal["input", "output"]  # the first positional input of the module's forward, or its output

HOOK_POINTS: dict[str, tuple[str, Side]] = {  # hook point -> (module name, the side of it that is the tensor)
    "hook_embed": ("embed", "output"),
    "blocks.{l}.hook_resid_pre": ("blocks.{l}", "input"),
    "blocks.{l}.ln1.hook_normalized": ("blocks.{l}.ln1", "output"),
    "blocks.{l}.attn.hook_q": ("blocks.{l}.attn.q", "output"),
    "blocks.{l}.attn.hook_k": ("blocks.{l}.attn.k", "output"),
    "blocks.{l}.attn.hook_v": ("blocks.{l}.attn.v", "output"),
    "blocks.{l}.attn.hook_z": ("blocks.{l}.attn.o", "input"),
    "blocks.{l}.hook_attn_out": ("blocks.{l}.attn.o", "output"),
    "blocks.{l}.hook_resid_mid": ("blocks.{l}.ln2", "input"),
    "blocks.{l}.ln2.hook_normalized": ("blocks.{l}.ln2", "output"),
    "blocks.{l}.hook_mlp_out": ("blocks.{l}.mlp", "output"),
    "hook_resid_final": ("ln_final", "input"),
    "ln_final.hook_normalized": ("ln_final", "output"),
}
SPLIT_INPUTS: dict[str, tuple[str, str]] = {  # hook point -> (the projection reading it per head, the norm before it)
    "blocks.{l}.hook_q_input": ("blocks.{l}.attn.q", "blocks.{l}.ln1"),
    "blocks.{l}.hook_k_input": ("blocks.{l}.attn.k", "blocks.{l}.ln1"),
    "blocks.{l}.hook_v_input": ("blocks.{l}.attn.v", "blocks.{l}.ln1"),
}
READER_INPUTS: dict[str, tuple[str, Side]] = {  # hook point -> (module name, side), besides SPLIT_INPUTS
    "blocks.{l}.hook_mlp_in": ("blocks.{l}.ln2", "input"),
}
# Where a family lacks the module above, the same tensor is found here (module name -> (module, side)):
# no pre-attention norm (OLMo-2): the attention reads resid_pre; no pre-MLP norm: the MLP reads resid_mid;
# a norm on the attention / MLP output (OLMo-2, Gemma): what is added to the residual is its output.
_FALLBACKS = {
    ("blocks.{l}.ln1", "output"): ("blocks.{l}", "input"),
    ("blocks.{l}.ln2", "input"): ("blocks.{l}.mlp", "input"),
    ("blocks.{l}.ln2", "output"): ("blocks.{l}.mlp", "input"),
}
_ADDED_TO_RESIDUAL = {"blocks.{l}.hook_attn_out": "blocks.{l}.ln1_post", "blocks.{l}.hook_mlp_out": "blocks.{l}.ln2_post"}


def family_hook_points(arch: Architecture) -> dict[str, tuple[str, Side]]:
    """HOOK_POINTS and READER_INPUTS as found in one family: hook point -> (module name, side)."""
    points = {}
    for name, (module_name, side) in {**HOOK_POINTS, **READER_INPUTS}.items():
        if name in _ADDED_TO_RESIDUAL and arch.has(_ADDED_TO_RESIDUAL[name]):
            module_name = _ADDED_TO_RESIDUAL[name]
        elif not arch.has(module_name) and (module_name, side) in _FALLBACKS:
            module_name, side = _FALLBACKS[module_name, side]
        points[name] = (module_name, side)
    return points


_BLOCK = re.compile(r"^blocks\.(\d+)(?=\.|$)")


class HookPointError(ValueError):
    """A hook point or module name this model does not have, or a model without a module table."""


def hf_model(model: nn.Module) -> nn.Module:
    """The HF causal LM inside `model` (a GatedModel or the HF model itself)."""
    return model.model if isinstance(model, GatedModel) else model


def _architecture(hf: nn.Module) -> Architecture:
    try:
        return architecture(hf)
    except ArchitectureError as err:
        raise HookPointError(f"{type(hf).__name__} has no named hook points: {err}") from None


def _module_paths(hf: nn.Module) -> Mapping[str, str]:
    return _architecture(hf).modules


def _template(name: str) -> tuple[str, int | None]:
    """'blocks.3.ln2' -> ('blocks.{l}.ln2', 3); names outside a block -> (name, None)."""
    match = _BLOCK.match(name)
    if match is None:
        return name, None
    return "blocks.{l}" + name[match.end():], int(match.group(1))


def _resolve_module(hf: nn.Module, module_template: str, layer: int | None, asked: str, kind: str) -> nn.Module:
    """The module `module_template` (of layer `layer`) of `hf`; errors name `asked`, the `kind` of name asked for."""
    paths = _module_paths(hf)
    if module_template not in paths:
        raise HookPointError(f"{type(hf).__name__} has no {kind} named {asked!r} "
                             f"(model family {_architecture(hf).family!r})")
    if layer is not None:
        n_layers = len(hf.get_submodule(paths["blocks"]))
        if layer >= n_layers:
            raise HookPointError(f"{type(hf).__name__} has {n_layers} layers: no {kind} named {asked!r}")
    return hf.get_submodule(paths[module_template].format(l=layer))


def module(model: nn.Module, name: str) -> nn.Module:
    """The module called `name` (e.g. 'embed', 'blocks.0.ln2', 'ln_final') in a GatedModel or HF causal LM."""
    return _resolve_module(hf_model(model), *_template(name), name, "module")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the module called `name` is (e.g. 'blocks.0.attn.k') in a GatedModel or HF causal LM."""
    module(model, name)  # the name exists
    hf = hf_model(model)
    template, layer = _template(name)
    hf.set_submodule(_module_paths(hf)[template].format(l=layer), new)


def layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a GatedModel or HF causal LM, in order."""
    return module(model, "blocks")


def hook_names(model: nn.Module) -> list[str]:
    """Every hook point of `model` but the reader inputs, layer by layer (those its family has: GPT-2's fused
    projection has no hook_q/k/v): each tensor once."""
    n_layers = len(layers(model))
    arch = _architecture(hf_model(model))
    points = family_hook_points(arch)
    per_layer = [name for name in HOOK_POINTS if name.startswith("blocks.") and arch.has(points[name][0])]
    return ["hook_embed",
            *[name.format(l=layer) for layer in range(n_layers) for name in per_layer],
            "hook_resid_final", "ln_final.hook_normalized"]


def per_head_projection(normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear projection where head h reads its own input: W_h normed_h (+ b_h).

    normed [b, p, n, d] (one input per head), weight [n * dh, d], bias [n * dh] or None  ->  [b, p, n * dh].
    """
    n_heads = normed.shape[2]
    out = torch.einsum("bphd,hed->bphe", normed, weight.view(n_heads, -1, weight.shape[-1])).flatten(2)
    return out if bias is None else out + bias


@dataclass
class HeadInputs:
    """What a split-input function may return instead of every head's input: new inputs for some heads only,
    the others reading the shared one. heads [m] long (distinct, indices into the projection's heads),
    inputs [b, p, m, d]."""

    heads: torch.Tensor
    inputs: torch.Tensor


class _SplitInput:
    """One split-input hook point: keeps the norm's input when the norm runs, shows it to `fn` once per
    head of the projection before the projection runs, and, given a replacement, computes the projection
    per head from it instead of the shared one; given `HeadInputs`, per head for those heads, shared for the
    others (each head's projection computed once)."""

    def __init__(self, fn: HookFn, norm: nn.Module, head_dim: int):
        self.fn, self.norm, self.head_dim = fn, norm, head_dim
        self.resid: torch.Tensor | None = None  # [b, p, d] the norm's latest input
        self.replacement: torch.Tensor | HeadInputs | None = None  # fn's answer for the projection's next run

    def attach(self, projection: nn.Module) -> list[RemovableHandle | _ForwardOverride]:
        return [self.norm.register_forward_pre_hook(self._keep_input),
                projection.register_forward_pre_hook(self._ask),
                _ForwardOverride(projection, self._project)]

    def _keep_input(self, module, args):
        self.resid = args[0]

    def _ask(self, module, args):
        b, p, d = self.resid.shape
        self.replacement = self.fn(self.resid[:, :, None, :].expand(b, p, module.weight.shape[0] // self.head_dim, d))

    def _project(self, module: nn.Module, forward: Callable, normed: torch.Tensor) -> torch.Tensor:
        new, self.replacement = self.replacement, None
        if new is None:
            return forward(normed)
        device = normed.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else normed.dtype
        if not isinstance(new, HeadInputs):  # every head's input: [b, p, n, d]
            # .forward skips the norm's own hooks
            return per_head_projection(self.norm.forward(new), module.weight, module.bias).to(dtype)
        weight = module.weight.view(-1, self.head_dim, module.weight.shape[1])  # [n, dh, d]
        bias = None if module.bias is None else module.bias.view(-1, self.head_dim)  # [n, dh]
        shared = torch.ones(len(weight), dtype=torch.bool, device=weight.device)
        shared[new.heads] = False
        out = normed.new_empty(*normed.shape[:-1], len(weight), self.head_dim, dtype=dtype)  # [b, p, n, dh]
        out[..., shared, :] = nn.functional.linear(
            normed, weight[shared].flatten(0, 1), None if bias is None else bias[shared].flatten()
        ).unflatten(-1, (-1, self.head_dim)).to(dtype)
        out[..., new.heads, :] = per_head_projection(
            self.norm.forward(new.inputs), weight[new.heads].flatten(0, 1),
            None if bias is None else bias[new.heads].flatten()).unflatten(-1, (-1, self.head_dim)).to(dtype)
        return out.flatten(-2)


class _ForwardOverride:
    """Runs `project(module, forward, x)` in place of `module`'s forward (its own hooks still run around it)
    until removed; `forward` is what ran before."""

    def __init__(self, module: nn.Module, project: Callable):
        self.module, self.previous = module, module.__dict__.get("forward")
        forward = module.forward
        module.forward = lambda x: project(module, forward, x)

    def remove(self) -> None:
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


def _head_dim(hf: nn.Module) -> int:
    cfg = hf.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _attacher(hf: nn.Module, name: str) -> Callable[[HookFn], list[RemovableHandle]]:
    """What attaches a function to hook point `name` of `hf` (checked here, before anything is attached)."""
    template, layer = _template(name)
    if template in SPLIT_INPUTS:
        projection, norm = (_resolve_module(hf, module_template, layer, name, "hook point")
                            for module_template in SPLIT_INPUTS[template])
        head_dim = _head_dim(hf)
        return lambda fn: _SplitInput(fn, norm, head_dim).attach(projection)
    points = family_hook_points(_architecture(hf))
    if template not in points:
        raise HookPointError(f"{type(hf).__name__} has no hook point named {name!r}")
    module_template, side = points[template]
    target = _resolve_module(hf, module_template, layer, name, "hook point")
    if side == "output":
        return lambda fn: [target.register_forward_hook(_output_hook(fn))]
    return lambda fn: [target.register_forward_pre_hook(_input_hook(fn, name))]


def _output_hook(fn: HookFn):
    def hook(module, args, output):
        return fn(output)
    return hook


def _input_hook(fn: HookFn, name: str):
    def hook(module, args):
        if not args:
            raise HookPointError(f"{type(module).__name__} got no positional input, which hook point {name} reads")
        new = fn(args[0])
        return None if new is None else (new, *args[1:])
    return hook


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[None]:
    """Attach `fns` (hook point name -> function) to a GatedModel or HF causal LM while the block runs;
    they are removed on exit, also when the block raises. Functions on one module run in the order given."""
    hf = hf_model(model)
    attachers = {name: _attacher(hf, name) for name in fns}  # every name checked before anything is attached
    handles = []
    try:
        for name, fn in fns.items():
            handles += attachers[name](fn)
        yield
    finally:
        for handle in handles:
            handle.remove()
