"""Mixed precision, one mechanism for every stage: `precision: auto | fp32 | bf16` in a stage's config.

Under "bf16" the stage's forward passes run inside `torch.autocast(device_type, dtype=torch.bfloat16)`:
matmuls and linear layers compute in bfloat16, while parameters (master weights), optimizer state and
whatever the stage computes outside autocast stay float32. Stages cast logits or pre-activations back to
float32 before loss reductions (cross-entropy, log-softmax, sums) and before the JumpReLU threshold.
Hardware without bfloat16 units is refused with `PrecisionError` (emulated bf16 is slower than fp32:
on an AVX2-only CPU a bf16 matmul ran ~40x slower than fp32), never silently run in fp32.

"auto", the default of the stages that default to bf16, is resolved when the config is validated
(`AutoPrecision`): bf16 where every device this process can use has bfloat16 units, fp32 elsewhere. The
validated config, and so the saved config and metrics.json, hold the resolved value, never "auto".
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator
from torch import nn

Precision = Literal["fp32", "bf16"]
PRECISION_DESCRIPTION = ("fp32, or bf16: forward passes under torch.autocast (bfloat16 matmuls; fp32 weights, "
                         "optimizer state and loss reductions); bf16 needs bfloat16 hardware (CUDA: Ampere or "
                         "newer; CPU: AVX512-BF16 or AMX)")
AUTO_DESCRIPTION = ("; auto (validated into one of them): bf16 where the CPU, and the GPU when torch sees one, "
                    "have bfloat16 units, else fp32")


class PrecisionError(RuntimeError):
    """bf16 asked for on a device without bfloat16 hardware support."""


def _cpu_has_bf16() -> bool:
    """oneDNN's probe of the CPU's instruction sets (AVX512-BF16, AMX, ...)."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bf16_supported(device_type: str) -> bool:
    """Whether `device_type` ("cpu" or "cuda") has native bfloat16 arithmetic."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return _cpu_has_bf16()
    return False


def auto_precision() -> Precision:
    """What "auto" means on this machine: bf16 where every device this process can use (the CPU, and CUDA
    when torch sees a GPU) has bfloat16 units, else fp32."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return "bf16" if all(bf16_supported(device) for device in devices) else "fp32"


def resolve_precision(setting: Literal["auto", "fp32", "bf16"]) -> Precision:
    """"auto" -> `auto_precision()`; "fp32" and "bf16" as they are (bf16 is checked where a stage starts)."""
    return auto_precision() if setting == "auto" else setting


# a config field's type: accepts auto, fp32 or bf16 and holds fp32 or bf16 once validated
AutoPrecision = Annotated[Literal["auto", "fp32", "bf16"], AfterValidator(resolve_precision)]


def check_precision(precision: Precision, device: str | torch.device = "cpu") -> None:
    """Raise PrecisionError where `precision` cannot run natively on `device`; fp32 runs everywhere."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', not {precision!r} ('auto' is resolved when a "
                         "config is validated: resolve_precision)")
    device_type = torch.device(device).type
    if precision == "bf16" and not bf16_supported(device_type):
        raise PrecisionError(
            f"precision 'bf16' was asked for, but this {device_type} has no native bfloat16 support "
            f"(torch {torch.__version__}); set precision: fp32 (or auto) in the stage's config"
        )


@contextlib.contextmanager
def autocast(precision: Precision, device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the block's forward passes in `precision` on `device` (checked first). fp32 disables any
    autocast around the block, so an fp32 stage computes in fp32 wherever it is called from."""
    check_precision(precision, device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def bf16_frozen(weight: torch.Tensor) -> nn.Parameter:
    """A new frozen bfloat16 Parameter holding `weight`'s values (the original is left as it is)."""
    return nn.Parameter(weight.detach().to(torch.bfloat16), requires_grad=False)


def store_linear_weights_in_bf16_(model: nn.Module) -> nn.Module:
    """In place: every nn.Linear weight of a frozen `model` becomes a bfloat16 Parameter (a new one, so an
    lm_head tied to the embedding is untied and the embedding stays fp32); biases and norms stay fp32.
    Under bf16 autocast this gives the same numbers as fp32 weights (autocast rounds them to bf16 on every
    call, and caches no cast of a weight without requires_grad) without recasting them per forward."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight = bf16_frozen(module.weight)
    return model


@contextlib.contextmanager
def frozen_linear_weights_in_bf16(model: nn.Module, precision: Precision) -> Iterator[None]:
    """Inside the block, under "bf16", every nn.Linear weight of `model` that requires no gradient is a
    bfloat16 copy, so autocast does not recast the frozen weights of a partly trained model on every forward
    (an lm_head tied to the embedding is untied for the block). On exit the original fp32 Parameters are put
    back: they are never written, so saved weights stay bit-identical and ties are restored. fp32: no change."""
    originals: list[tuple[nn.Linear, nn.Parameter]] = []
    if precision == "bf16":
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.requires_grad:
                originals.append((module, module.weight))
                module.weight = bf16_frozen(module.weight)
    try:
        yield
    finally:
        for module, weight in originals:
            module.weight = weight


def frozen_copy(model: nn.Module, precision: Precision) -> nn.Module:
    """`model` for forward passes of frozen weights in `precision`: under "bf16" a copy with its Linear
    weights stored in bfloat16 (`store_linear_weights_in_bf16_`), under "fp32" `model` itself. The Linear
    weights are cast straight into the copy, never first copied in fp32 (a weight that a module other than
    a Linear also holds, as an embedding tied to the lm_head, is copied in fp32 and stays so there)."""
    if precision == "fp32":
        return model
    held_elsewhere = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    memo = {id(m.weight): bf16_frozen(m.weight)
            for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in held_elsewhere}
    return store_linear_weights_in_bf16_(copy.deepcopy(model, memo))
