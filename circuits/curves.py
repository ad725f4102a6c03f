"""Component circuits: rank heads and edges by attribution patching, then trace explained effect
against the number kept by activation patching.

Ranking is attribution patching (EAP, Syed et al. / Hanna et al.): score(u, v) = (corrupted - clean
write of u) . d metric / d (input of v), on the clean run, summed over positions, averaged over prompts;
a head's node score is the sum over its out-edges (= its write difference . d metric / d write).
Heads and edges are kept in order of |score|; edge counts include the embed -> x and x -> logits edges.

Edges are traced twice: between components (summed over positions), and resolved by token position
(`position_edges`): u -> v at position p is u's write at p read by v's input at p (the residual stream
is per position; only attention moves information across positions, inside a head). Positions count
from the prompt's last token, so prompts of different lengths share edges by their distance to the
answer. Sparse attention should show here: a head's k/v inputs matter only at the keys it keeps open.
Explained effect = (m(kept) - m(none kept)) / (m(all kept) - m(none kept)), m = mean logit difference
over the prompts; with no edge kept the logits read the corrupted residual, so m(none) is the
corrupted run's metric. For the heads curve MLPs are always kept and computed freshly; m(none) is
"every head patched".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from circuits.config import CURVE_KINDS, CircuitError, ComponentCircuitConfig
from circuits.hooks import PreparedModel, edge_attribution, patched_metric, prepare, record
from circuits.layout import ComponentLayout, top_k_mask
from circuits.stats import bootstrap_ratio
from prompts.batches import PromptBatch, encode_prompts
from prompts.metrics import logit_diff
from prompts.tasks import TaskPrompt
from runtime.precision import autocast

# --------------------------------------------------------------------------------------------------
# Counts on a curve


def explained_effect(metric: float, full: float, empty: float) -> float:
    """(metric - empty) / (full - empty): 1 = the whole model's effect, 0 = everything patched."""
    return (metric - empty) / (full - empty)


def count_grid(total: int, points: int) -> list[int]:
    """0, a geometric grid 1..total of about `points` counts, and total (sorted, unique)."""
    grid = {0, total}
    if total >= 1:
        grid |= {round(math.exp(i * math.log(total) / max(points - 1, 1))) for i in range(points)}
    return sorted(grid)


def count_to_reach(
    evaluate: Callable[[int], float], grid: Sequence[int], target: float, refine: bool = True
) -> tuple[int | None, dict[int, float]]:
    """Smallest count whose effect reaches `target`: the first grid count that does, then (with
    `refine`) bisection between it and the grid count before, assuming the curve is monotone there.
    Returns (count or None if no grid count reaches it, every evaluated {count: effect})."""
    effects = {count: evaluate(count) for count in grid}
    reached = [count for count in grid if effects[count] >= target]
    if not reached:
        return None, effects
    hi = reached[0]
    lower = [count for count in grid if count < hi]
    lo = lower[-1] if lower else hi
    while refine and hi - lo > 1:
        mid = (lo + hi) // 2
        effects[mid] = evaluate(mid)
        lo, hi = (lo, mid) if effects[mid] >= target else (mid, hi)
    return hi, dict(sorted(effects.items()))


def count_staying_above(effects: dict[int, float], target: float) -> int | None:
    """Smallest evaluated count from which every larger evaluated count reaches `target` (the curves are
    not monotone: keeping more components can lower the metric; this is the robust reading)."""
    count = None
    for k in sorted(effects, reverse=True):
        if effects[k] < target:
            break
        count = k
    return count


# --------------------------------------------------------------------------------------------------
# Curves of one model on one prompt set


@dataclass
class Curve:
    """Explained effect against the number of components kept, and the count reaching the target."""

    total: int
    counts: list[int]
    effects: list[float]
    count_at_target: int | None  # first crossing (see count_to_reach)
    count_stays_above: int | None  # smallest evaluated count from which every evaluated count reaches it
    metric_full: float
    metric_empty: float
    top: list[tuple[str, float]]  # best-ranked components with their EAP scores


@dataclass
class CircuitResult:
    """Component circuit of one model on one task: EAP ranking checked by activation patching."""

    task: str
    n_prompts: int
    metric_clean: float
    metric_corrupted: float
    heads: Curve
    edges: Curve
    config: dict
    position_edges: Curve | None = None  # edges resolved by position (config.position_edges)

    def to_json(self) -> dict:
        return asdict(self)


class PromptSet:
    """Encoded batches with their corrupted recordings, evaluated together as one mean metric."""

    def __init__(self, prepared: PreparedModel, batches: list[PromptBatch]):
        self.prepared, self.batches = prepared, batches
        self.recordings, corrupted_metrics = [], []
        for batch in batches:
            recording, logits = record(prepared, batch.corrupted)
            self.recordings.append(recording)
            corrupted_metrics.append(logit_diff(logits, batch))
        self.n_prompts = sum(len(b.indices) for b in batches)
        self.n_positions = max(b.clean.shape[1] for b in batches)  # per-position edges count from the end
        self.metric_corrupted = torch.cat(corrupted_metrics).mean().item()

    def mean_metric(self, **keep) -> float:
        """Mean logit diff over the prompts with `keep` (see patched_metric); no keep = the clean run."""
        total = sum(patched_metric(self.prepared, b, r, **keep).sum() for b, r in zip(self.batches, self.recordings))
        return float(total) / self.n_prompts

    def edge_scores(self, by_position: bool = False) -> torch.Tensor:
        """Mean EAP score per edge over the prompts: [U, V], or by position [U, V, n_positions] (its sum
        over positions is the [U, V] score)."""
        n_positions = self.n_positions if by_position else None
        total = sum(edge_attribution(self.prepared, b, r, n_positions) for b, r in zip(self.batches, self.recordings))
        return total / self.n_prompts


def head_scores(edge_scores: torch.Tensor, layout: ComponentLayout) -> torch.Tensor:
    """Node EAP score of every head, the sum of its out-edges' scores.  [U, V] -> [L, H]."""
    rows = [layout.head_row(layer, 0) + h for layer in range(layout.n_layers) for h in range(layout.n_heads)]
    return edge_scores[rows].sum(1).view(layout.n_layers, layout.n_heads)


def _check_effect(kind: str, full: float, empty: float) -> None:
    if abs(full - empty) < 1e-6:
        raise CircuitError(f"patching every {kind} leaves the metric at {full:.4g}: the corruption does not "
                           "change this model's answer on these prompts, so no effect can be explained")


def head_curve(prompt_set: PromptSet, edge_scores: torch.Tensor, metric_clean: float,
               config: ComponentCircuitConfig) -> Curve:
    """Explained effect with the top-k heads by |node EAP| kept (others patched), MLPs always kept."""
    layout = prompt_set.prepared.layout
    scores = head_scores(edge_scores, layout)  # [L, H]
    all_heads = torch.ones(scores.shape, dtype=torch.bool)
    empty = prompt_set.mean_metric(keep_heads=~all_heads)
    _check_effect("head", metric_clean, empty)

    def effect(k: int) -> float:
        keep = top_k_mask(scores, all_heads, k)
        return explained_effect(prompt_set.mean_metric(keep_heads=keep), metric_clean, empty)

    count, effects = count_to_reach(effect, count_grid(scores.numel(), config.curve_points), config.target,
                                    config.refine)
    names = [f"blocks.{layer}.head.{h}" for layer in range(layout.n_layers) for h in range(layout.n_heads)]
    top = _ranked(scores.flatten(), config.top_stored, names.__getitem__)
    return Curve(scores.numel(), list(effects), list(effects.values()), count,
                 count_staying_above(effects, config.target), metric_clean, empty, top)


def edge_curve(prompt_set: PromptSet, edge_scores: torch.Tensor, metric_clean: float,
               config: ComponentCircuitConfig) -> Curve:
    """Explained effect with the top-k edges by |EAP| kept (all others patched).  edge_scores [U, V], or
    [U, V, P] for edges resolved by position."""
    layout = prompt_set.prepared.layout
    allowed = layout.allowed()
    if edge_scores.dim() == 3:
        allowed = allowed[:, :, None].expand(edge_scores.shape).contiguous()
    empty = prompt_set.mean_metric(keep_edges=torch.zeros_like(allowed))
    _check_effect("edge", metric_clean, empty)

    def effect(k: int) -> float:
        keep = top_k_mask(edge_scores, allowed, k)
        return explained_effect(prompt_set.mean_metric(keep_edges=keep), metric_clean, empty)

    total = int(allowed.sum())
    count, effects = count_to_reach(effect, count_grid(total, config.curve_points), config.target, config.refine)
    rows, cols = layout.row_names(), layout.col_names()
    n_pos = edge_scores.shape[2] if edge_scores.dim() == 3 else 1

    def name(i: int) -> str:  # per position: "@-1" is the last token
        edge, pos = divmod(i, n_pos)
        where = f" @{pos - n_pos}" if edge_scores.dim() == 3 else ""
        return f"{rows[edge // layout.n_cols]} -> {cols[edge % layout.n_cols]}{where}"

    top = _ranked(edge_scores.masked_fill(~allowed, 0).flatten(), min(config.top_stored, total), name)
    return Curve(total, list(effects), list(effects.values()), count, count_staying_above(effects, config.target),
                 metric_clean, empty, top)


# --------------------------------------------------------------------------------------------------
# Runs and dense vs sparse comparisons


def run(config: ComponentCircuitConfig, model: nn.Module, tokenizer, prompts: Sequence[TaskPrompt]) -> CircuitResult:
    """Rank heads and edges by EAP on `prompts`, then trace explained effect against the number kept."""
    prepared = prepare(model, config.split_qkv, config.gate_gradient, config.precision)
    return run_prepared(config, prepared, tokenizer, prompts)


def run_prepared(config: ComponentCircuitConfig, prepared: PreparedModel, tokenizer, prompts: Sequence[TaskPrompt]
                 ) -> CircuitResult:
    """`run` on a model already prepared (with config's split_qkv and gate_gradient), so callers that trace
    several prompt sets copy the model once."""
    if not prompts:
        raise CircuitError("component circuits need at least one prompt")
    if prepared.precision != config.precision:
        raise CircuitError(f"the model was prepared for precision {prepared.precision!r}, the config asks for "
                           f"{config.precision!r}; prepare it with precision=config.precision")
    with autocast(config.precision, next(prepared.module.parameters()).device):  # logits come out fp32
        prompt_set = PromptSet(prepared, encode_prompts(prompts, tokenizer, config.batch_size))
        position_scores = prompt_set.edge_scores(by_position=True) if config.position_edges else None  # [U, V, P]
        scores = position_scores.sum(-1) if config.position_edges else prompt_set.edge_scores()  # [U, V]
        metric_clean = prompt_set.mean_metric()
        return CircuitResult(
            task=prompts[0].task, n_prompts=prompt_set.n_prompts, metric_clean=metric_clean,
            metric_corrupted=prompt_set.metric_corrupted, heads=head_curve(prompt_set, scores, metric_clean, config),
            edges=edge_curve(prompt_set, scores, metric_clean, config), config=config.model_dump(),
            position_edges=None if position_scores is None else edge_curve(prompt_set, position_scores,
                                                                          metric_clean, config),
        )


def run_per_prompt(config: ComponentCircuitConfig, model: nn.Module, tokenizer, prompts: Sequence[TaskPrompt]
                   ) -> list[CircuitResult | str]:
    """One circuit per prompt (its own EAP ranking and patching curves): its CircuitResult, or why it has none
    (the corruption does not move that prompt's metric). Per-prompt sizes give intervals over prompts."""
    prepared = prepare(model, config.split_qkv, config.gate_gradient, config.precision)
    return run_prepared_per_prompt(config, prepared, tokenizer, prompts)


def run_prepared_per_prompt(config: ComponentCircuitConfig, prepared: PreparedModel, tokenizer,
                            prompts: Sequence[TaskPrompt]) -> list[CircuitResult | str]:
    """`run_per_prompt` on a model already prepared: one copy of the model serves every prompt."""
    results: list[CircuitResult | str] = []
    for prompt in prompts:
        try:
            results.append(run_prepared(config, prepared, tokenizer, [prompt]))
        except CircuitError as error:
            results.append(str(error))
    return results


def compare_per_prompt(dense: Sequence[CircuitResult | str], sparse: Sequence[CircuitResult | str],
                       samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Per kind, over the prompts whose dense and sparse circuits both reach the target: the counts, their
    means, and mean(dense) / mean(sparse) with a percentile-bootstrap CI (prompts resampled in pairs)."""
    if len(dense) != len(sparse):
        raise CircuitError(f"{len(dense)} dense but {len(sparse)} sparse per-prompt circuits: they pair by prompt")
    rng = np.random.default_rng(seed)
    summary: dict = {"n_prompts": len(dense), "confidence": confidence}
    for kind in CURVE_KINDS:
        curves = [(getattr(d, kind, None), getattr(s, kind, None)) for d, s in zip(dense, sparse)]
        if all(d is None or s is None for d, s in curves):
            continue
        pairs = [(d.count_at_target, s.count_at_target) for d, s in curves if d is not None and s is not None
                 and d.count_at_target is not None and s.count_at_target is not None]
        dense_counts = np.array([d for d, _ in pairs], dtype=np.float64)
        sparse_counts = np.array([s for _, s in pairs], dtype=np.float64)
        ratio, low, high = bootstrap_ratio(dense_counts, sparse_counts, samples, confidence, rng)
        summary[kind] = {
            "n_pairs": len(pairs), "dense_counts": dense_counts.astype(int).tolist(),
            "sparse_counts": sparse_counts.astype(int).tolist(),
            "dense_mean": float(dense_counts.mean()) if pairs else None,
            "sparse_mean": float(sparse_counts.mean()) if pairs else None,
            "ratio": ratio, "ci_low": low, "ci_high": high,
        }
    return summary


def _ranked(scores: torch.Tensor, k: int, name: Callable[[int], str]) -> list[tuple[str, float]]:
    """The k entries with the largest |score|, named, with their signed scores."""
    order = torch.sort(scores.abs(), descending=True, stable=True).indices[:k]
    return [(name(i), scores[i].item()) for i in order.tolist()]


def compare(dense: CircuitResult, sparse: CircuitResult) -> dict:
    """Dense / sparse ratio of the heads and edges needed to reach the target explained effect, for the
    first crossing and for the count from which the curve stays above the target."""
    def ratio(a: int | None, b: int | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    summary: dict = {"task": dense.task, "target": dense.config["target"]}
    for kind in CURVE_KINDS:
        d, s = getattr(dense, kind), getattr(sparse, kind)
        if d is None or s is None:
            continue
        summary[kind] = {
            "dense": d.count_at_target, "sparse": s.count_at_target, "ratio": ratio(d.count_at_target, s.count_at_target),
            "dense_stays_above": d.count_stays_above, "sparse_stays_above": s.count_stays_above,
            "ratio_stays_above": ratio(d.count_stays_above, s.count_stays_above),
        }
    return summary
