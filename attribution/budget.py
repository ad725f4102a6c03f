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
from attribution.propagate import WRITES_CHUNK_ROWS
from attribution.prune import PARTIAL_CHUNK_ROWS
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
    """Freezing the prompt and building its replacement model: the attention patterns (one float32 [L, H, P, P]
    tensor that each layer's weights are copied into as it runs, plus one layer's scores, mask, softmax and
    weights in flight: about six [H, P, P], measured on the tiny model), logits of every position, the
    residuals the prompt keeps (and their per-layer lists while stacked), the CLT's pre-activations, errors
    and constants."""
    L, H, d = weights.n_layers, weights.n_heads, weights.d_model
    patterns = (L + 6) * H * n_pos * n_pos
    logits = n_pos * weights.unembed.shape[0]
    residuals = 10 * L * n_pos * d + 8 * n_pos * d  # resid_pre, mid, mlp in/out, errors, ...; one MLP's width
    clt = 2 * L * n_pos * n_features
    return (patterns + logits + residuals + clt) * FLOAT_BYTES


def graph_bytes(weights: ModelWeights, n_pos: int, n_active: int, n_logits: int, config: GraphConfig) -> int:
    """The graph of a prompt with `n_active` active features, the larger of its two phases.

    Computing it: the rows computed (every active feature's, or with max_feature_nodes the visited features'
    over every source column, plus one visit's batch), the swept blocks (gradients [B, P, d] and attention's
    temporaries, their outputs [n_columns, B]), one chunk of decoder writes, partial influences' chunks, and the
    graph's rows gathered from them ([R, N], R = selected features + logits, N = nodes: linear in positions).
    Pruning and storing it: about ten [R, N] temporaries (|rows|, its pruned and normalised copies, edge
    scores, their sort with its int64 indices and cumulative sum, the edge list)."""
    L, d = weights.n_layers, weights.d_model
    n_columns = n_active + (L + 1) * n_pos
    grad_rows = config.max_grad_mib * 2**20 // (n_pos * d * FLOAT_BYTES)  # rows swept together (one block at least)
    if config.max_feature_nodes is None or config.max_feature_nodes >= n_active:
        n_selected = n_active
        swept = min(n_active + n_logits, max(grad_rows, config.max_block_rows))
        held = (n_active + n_logits) * n_columns
    else:
        n_selected = config.max_feature_nodes
        queue = config.update_interval * config.batch_size
        swept = min(queue, max(grad_rows, config.max_block_rows))
        held = (n_selected + n_logits) * (n_columns + n_logits) + queue * n_columns + 2 * PARTIAL_CHUNK_ROWS * n_columns
    sweep = swept * (5 * n_pos * d + 2 * n_columns) + WRITES_CHUNK_ROWS * d
    graph_rows = (n_selected + n_logits) * (n_selected + (L + 1) * n_pos + n_logits)
    computing = held + sweep + 2 * graph_rows
    pruning = 10 * graph_rows
    return max(computing, pruning) * FLOAT_BYTES
