"""Memory of the per-prompt attribution step: its budget, and estimates made before allocating.

The budget is what one prompt's attribution may hold beyond the loaded model and CLT. Each phase is
checked before it allocates, from sizes known by then: freezing the prompt and building the replacement
model (positions), the graph (active features), head loadings (kept edges: they are chunked to fit,
`attribution.heads.plan_head_chunks`). A phase that cannot fit raises MemoryBudgetError, an
AttributionError, so the stage records the prompt as a failure and goes on.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
from pathlib import Path

import torch

from attribution.config import GraphConfig
from attribution.replacement import AttributionError, ModelWeights

FLOAT_BYTES = 4
DEFAULT_BUDGET_SHARE = 0.8  # of the memory available, when no budget is configured
GIB = 2**30


class MemoryBudgetError(AttributionError):
    """One prompt's attribution would need more memory than the budget allows."""


def check_fits(what: str, needed: int, budget: int) -> None:
    """Raise MemoryBudgetError if `needed` bytes exceed `budget`."""
    if needed > budget:
        raise MemoryBudgetError(
            f"{what} needs about {needed / GIB:.2f} GiB, over the memory budget of {budget / GIB:.2f} GiB; "
            "raise memory_budget_gb or shorten the prompt"
        )


def budget_bytes(memory_budget_gb: float | None) -> int:
    """The configured budget in bytes, or (None) the default: a share of the memory available now."""
    return int(memory_budget_gb * GIB) if memory_budget_gb is not None else default_budget_bytes()


def default_budget_bytes() -> int:
    """DEFAULT_BUDGET_SHARE of the memory this process can still take: the machine's (or its cgroup's)
    available memory, and in a Ray task or actor with a `memory` resource, that resource less what the
    process holds already."""
    limits = [available_memory_bytes()]
    task_memory = ray_task_memory_bytes()
    if task_memory is not None:
        limits.append(task_memory - resident_bytes())
    return max(0, int(DEFAULT_BUDGET_SHARE * min(limits)))


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """MemAvailable of the machine, or less if a cgroup (v2) limit leaves less (its limit less its working set:
    memory in use without the inactive page cache)."""
    if meminfo.exists():
        fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    else:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit, current = cgroup / "memory.max", cgroup / "memory.current"
    if limit.exists() and current.exists() and limit.read_text().strip() != "max":
        # memory.current counts the page cache too; its inactive part is reclaimed before anything is killed
        working_set = int(current.read_text()) - cgroup_stat(cgroup / "memory.stat").get("inactive_file", 0)
        available = min(available, int(limit.read_text()) - working_set)
    return available


def cgroup_stat(path: Path) -> dict[str, int]:
    """A cgroup v2 `memory.stat` file as {field: bytes} (empty if absent)."""
    if not path.exists():
        return {}
    return {name: int(value) for name, value in (line.split() for line in path.read_text().splitlines())}


def resident_bytes() -> int:
    """This process's resident memory now."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def ray_task_memory_bytes() -> int | None:
    """The `memory` resource (bytes) of the Ray task or actor running this code, if any."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # the driver has no assigned resources
        return None
    memory = context.get_assigned_resources().get("memory")
    return int(memory) if memory else None


def tensor_bytes(*objects: object) -> int:
    """Bytes of the tensors held directly by dataclass `objects` (fields that are tensors)."""
    total = 0
    for obj in objects:
        for field in dataclasses.fields(obj):
            value = getattr(obj, field.name)
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def frozen_prompt_bytes(weights: ModelWeights, n_pos: int, n_features: int) -> int:
    """Freezing the prompt and building its replacement model: the forward pass's attention patterns
    (kept for every layer, then stacked) and logits, the residuals the prompt keeps, the CLT's
    pre-activations, errors and constants."""
    L, H, d = weights.n_layers, weights.n_heads, weights.d_model
    patterns = 3 * L * H * n_pos * n_pos
    logits = n_pos * weights.unembed.shape[0]
    residuals = 10 * L * n_pos * d + 8 * n_pos * d  # resid_pre, mid, mlp in/out, errors, ...; one MLP's width
    clt = 2 * L * n_pos * n_features
    return (patterns + logits + residuals + clt) * FLOAT_BYTES


def graph_bytes(weights: ModelWeights, n_pos: int, n_active: int, n_logits: int, config: GraphConfig) -> int:
    """The graph of a prompt with `n_active` active features, the larger of its two phases: computing
    it (every feature's rows, or max_feature_nodes visited features' with the decoder writes of every
    layer cached; the swept blocks' gradients and outputs; the adjacency assembled from the rows) and
    pruning it (the adjacency and about nine [N, N] temporaries: |A|, its normalised and pruned
    copies, edge scores, their sort with its int64 indices and cumulative sum; measured on the tiny model)."""
    L, d = weights.n_layers, weights.d_model
    n_columns = n_active + (L + 1) * n_pos
    if config.max_feature_nodes is None or config.max_feature_nodes >= n_active:
        n_rows, writes = n_active + n_logits, n_active * d
    else:
        n_rows, writes = config.max_feature_nodes + n_logits, n_active * d * (L + 1) // 2
    grad_rows = config.max_grad_mib * 2**20 // (n_pos * d * FLOAT_BYTES)  # rows swept together (one block at least)
    swept = min(n_rows, max(grad_rows, config.max_block_rows))
    sweep = swept * (2 * n_pos * d + n_columns)  # their gradients, attention's temporaries, their outputs
    n_nodes = n_rows + (L + 1) * n_pos
    adjacency = n_nodes * n_nodes
    computing = n_rows * (n_columns + n_logits) + sweep + writes + adjacency
    pruning = 10 * adjacency
    return max(computing, pruning) * FLOAT_BYTES
