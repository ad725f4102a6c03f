"""Component circuits: rank heads and edges, then trace explained effect against the number kept by
activation patching, with the gates handled the same way in both (`hooks`: frozen or recomputed).

Ranking: heads by exact single-head patching (`head_ranking = "exact"`, one pass per head) or EAP node
scores; edges by EAP-IG (Hanna et al. 2024, `edge_ranking = "eap_ig"`) or EAP: score(u, v) = (corrupted -
clean write of u) . d metric / d (input of v), the gradient averaged over embeddings interpolated between
corrupted and clean (EAP-IG) or taken on the clean run (EAP), summed over positions, averaged over prompts.
Components are kept in order of |score|. `ranking_faithfulness` reports the Spearman correlation of the
scores with exact single-component patching.

Edges are traced twice: between components (summed over positions), and resolved by token role
(`role_edges`): u@r -> v@r is u's write at the tokens of role r read by v's input at those tokens (the
residual stream is per position, so writer and reader share the token and its role; only attention moves
information across positions, inside a head). Roles come from the task generator (`prompts.tasks.token_roles`:
IOI's S1, IO, S2, ..., every prompt's last token `end`), so prompts of different templates and lengths share
an edge where their tokens play the same part; a role edge's score is the sum of its tokens' scores, and
keeping it keeps every one of its tokens' edges in every prompt. Explained effect = (m(kept) - m(none kept))
/ (m(all kept) - m(none kept)), m = mean logit difference over the prompts; with no edge kept the logits read
the corrupted residual, so m(none) is the corrupted run's metric. For the heads curve MLPs are always kept
and computed freshly; m(none) is "every head patched".

Counting what carries signal: a head that writes nothing on every clean and corrupted run (every gate
closed at every position) is no component: it is always computed and never counted, nor are the edges
into or out of it. An edge count is the number of kept edges on a path from the inputs to the logits
(`layout.live_edges`; the others do not change the patched metric). Curves are not monotone, so each is
read twice (`read_curve`): the first crossing of the target and the smallest count from which every
evaluated count stays above it, with counts evaluated densely between the two; `compare` gives both with
bootstrap CIs over prompts and a behaviour gate (both models must do the task).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from circuits.config import CURVE_KINDS, GATE_MODES, CircuitError, ComponentCircuitConfig
from circuits.hooks import (
    PreparedModel,
    clean_masks,
    edge_attribution,
    edge_patched_metrics,
    head_patched_metrics,
    patched_metric,
    prepare,
    record,
)
from circuits.layout import ComponentLayout, column_rows, live_edges, live_role_edges, top_k_mask, top_k_masks
from circuits.stats import bootstrap_ratio, spearman
from prompts.batches import PromptBatch, encode_prompts
from prompts.metrics import logit_diff
from prompts.tasks import TaskPrompt
from runtime.precision import autocast
from sparse_attention.gated_attention import gate_mode

# --------------------------------------------------------------------------------------------------
# Reading a curve


def explained_effect(metric: float, full: float, empty: float) -> float:
    """(metric - empty) / (full - empty): 1 = the whole model's effect, 0 = everything patched."""
    return (metric - empty) / (full - empty)


def count_grid(total: int, points: int) -> list[int]:
    """0, a geometric grid 1..total of about `points` counts, and total (sorted, unique)."""
    grid = {0, total}
    if total >= 1:
        grid |= {round(math.exp(i * math.log(total) / max(points - 1, 1))) for i in range(points)}
    return sorted(grid)


def first_crossing(effects: dict[int, float], target: float) -> int | None:
    """Smallest evaluated count whose effect reaches `target`."""
    return min((k for k, e in effects.items() if e >= target), default=None)


def count_staying_above(effects: dict[int, float], target: float) -> int | None:
    """Smallest evaluated count from which every larger evaluated count reaches `target` (the curves are
    not monotone: keeping more components can lower the metric; this is the robust reading)."""
    count = None
    for k in sorted(effects, reverse=True):
        if effects[k] < target:
            break
        count = k
    return count


def read_curve(evaluate: Callable[[int], float], grid: Sequence[int], target: float, dense_points: int = 0,
               refine: bool = True, evaluate_many: Callable[[list[int]], list[float]] | None = None
               ) -> tuple[int | None, int | None, dict[int, float]]:
    """(first crossing, stays-above count, every evaluated {count: effect}).

    Evaluates the grid, then `dense_points` counts evenly between the grid count before the first crossing
    and the stays-above count, then (`refine`) bisects the gap below each reading down to one count: the
    first crossing's gap holds only counts below it, the stays-above count's gap ends at the last count
    under the target. Both readings are over every evaluated count. `evaluate_many` (counts -> effects), when
    given, evaluates the grid and the dense counts, each set in one call."""
    many = evaluate_many or (lambda counts: [evaluate(count) for count in counts])
    effects = dict(zip(grid, many(list(grid))))

    def add_all(counts: list[int]) -> None:
        new = [count for count in counts if count not in effects]
        if new:
            effects.update(zip(new, many(new)))

    first, stays = first_crossing(effects, target), count_staying_above(effects, target)
    if first is None:
        return None, stays, dict(sorted(effects.items()))
    below = [k for k in effects if k < first]
    low = max(below) if below else first
    high = stays if stays is not None else max(effects)
    add_all(np.unique(np.linspace(low, high, dense_points + 2).round().astype(int)).tolist())
    if refine:
        for reading in (first_crossing, count_staying_above):
            while True:
                reached = reading(effects, target)
                if reached is None:
                    break
                gap = [k for k in effects if k < reached]
                if not gap or reached - max(gap) <= 1:
                    break
                add_all([(max(gap) + reached) // 2])
    return first_crossing(effects, target), count_staying_above(effects, target), dict(sorted(effects.items()))


def readings(prompt_metrics: np.ndarray, counts: Sequence[int], carrying: Sequence[int], target: float,
             prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First crossing and stays-above count (in `carrying` units; NaN where none) of the curve re-read on
    resampled prompts.  prompt_metrics [C, n] per evaluated count (sorted, including 0 and the total, the
    empty and full circuits), prompts [S, n] resampled prompt indices  ->  ([S], [S])."""
    means = prompt_metrics[:, prompts].mean(-1).T  # [S, C]
    full, empty = means[:, [-1]], means[:, [0]]
    with np.errstate(divide="ignore", invalid="ignore"):
        reached = (means - empty) / (full - empty) >= target  # [S, C]
    carrying = np.asarray(carrying, dtype=np.float64)
    first = np.where(reached.any(1), carrying[reached.argmax(1)], np.nan)
    tail = np.flip(np.cumprod(np.flip(reached, 1), 1), 1).astype(bool)  # reached from here to the end
    stays = np.where(tail.any(1), carrying[tail.argmax(1)], np.nan)
    return first, stays


# --------------------------------------------------------------------------------------------------
# Curves of one model on one prompt set


@dataclass
class Curve:
    """Explained effect against the number of components kept, and the counts reaching the target.

    counts: ranked components kept (top-k) at each evaluated point; carrying: how many of them carry signal
    (edges on a path from the inputs to the logits, `live_edges`; heads: every kept head, dead heads being
    no component). The counts at the target are in carrying units."""

    total: int
    counts: list[int]
    effects: list[float]
    count_at_target: int | None  # first crossing
    count_stays_above: int | None  # smallest count from which every evaluated count reaches the target
    metric_full: float
    metric_empty: float
    top: list[tuple[str, float]]  # best-ranked components with their ranking scores
    carrying: list[int] = field(default_factory=list)
    prompt_metrics: list[list[float]] = field(default_factory=list)  # [count][prompt] logit diff, prompt order


@dataclass
class CircuitResult:
    """Component circuit of one model on one task: ranking checked by activation patching."""

    task: str
    n_prompts: int
    metric_clean: float
    metric_corrupted: float
    heads: Curve
    edges: Curve
    config: dict
    role_edges: Curve | None = None  # edges resolved by token role (config.role_edges)
    roles: list[str] = field(default_factory=list)  # the token roles of the prompts, in order of first appearance
    gates: str = "recomputed"  # how the gates were handled ("frozen" / "recomputed"; the same without gates)
    accuracy_clean: float = float("nan")  # share of prompts with clean logit diff > 0
    dead_heads: list[str] = field(default_factory=list)  # heads that write nothing on any clean or corrupted run
    faithfulness: dict | None = None  # Spearman of ranking scores with exact patching (see ranking_faithfulness)
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per phase: record, edge_ranking, head_patching, ...

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> CircuitResult:
        """The inverse of `to_json` (JSON's lists stand for the curves' tuples)."""
        curves = {kind: None if data.get(kind) is None else Curve(**{**data[kind], "top": [tuple(t) for t in
                                                                                         data[kind]["top"]]})
                  for kind in CURVE_KINDS}
        return cls(**{**data, **curves})


class PromptSet:
    """Encoded batches with their corrupted recordings (and, when gates are frozen, the clean runs' gate
    masks, which the corrupted run uses too), evaluated together as one mean metric."""

    def __init__(self, prepared: PreparedModel, batches: list[PromptBatch]):
        self.prepared, self.batches = prepared, batches
        self.masks, self.recordings, corrupted_metrics, clean_metrics = [], [], [], []
        layout = prepared.layout
        head_rows = [layout.head_row(layer, h) for layer in range(layout.n_layers) for h in range(layout.n_heads)]
        writes = torch.zeros(len(head_rows))
        for batch in batches:
            masks = clean_masks(prepared, batch.clean)
            with prepared.gates_of(masks):
                recording, logits = record(prepared, batch.corrupted)
                clean, clean_logits = record(prepared, batch.clean)
            self.masks.append(masks)
            self.recordings.append(recording)
            corrupted_metrics.append(logit_diff(logits, batch))
            clean_metrics.append(logit_diff(clean_logits, batch))
            for run in (recording, clean):
                writes += run.writes[head_rows].abs().flatten(1).amax(1)
        self.order = torch.tensor([i for b in batches for i in b.indices]).argsort()  # batch order -> prompt order
        self.n_prompts = len(self.order)
        self.roles = list(dict.fromkeys(role for b in batches for prompt in b.roles for role in prompt))
        index = {role: i for i, role in enumerate(self.roles)}
        self.token_roles = [torch.tensor([[index[role] for role in prompt] for prompt in b.roles])
                            for b in batches]  # per batch [b, p] long: each token's index into self.roles
        self.prompt_clean = torch.cat(clean_metrics)[self.order]  # [n]
        self.prompt_corrupted = torch.cat(corrupted_metrics)[self.order]  # [n]
        self.metric_corrupted = self.prompt_corrupted.mean().item()
        self.dead_heads = (writes == 0).view(layout.n_layers, layout.n_heads)  # [L, H] writes nothing anywhere

    def prompt_metrics(self, **keep) -> torch.Tensor:
        """Logit diff per prompt [n] (prompt order) with `keep` (see patched_metric); no keep = the clean run."""
        runs = [patched_metric(self.prepared, b, r, m, token_roles=t, **keep)
                for b, r, m, t in zip(self.batches, self.recordings, self.masks, self.token_roles)]
        return torch.cat(runs)[self.order]

    def edge_metrics(self, keeps: torch.Tensor, max_tokens: int = 512) -> torch.Tensor:
        """Logit diff per mask and prompt [K, n] (prompt order) with the edges of keeps[k] kept: [K, U, V], or by
        token role [K, U, V, R]; several masks per forward, at most `max_tokens` tokens each (`edge_patched_metrics`)."""
        runs = [edge_patched_metrics(self.prepared, b, r, keeps, m, t if keeps.dim() == 4 else None, max_tokens)
                for b, r, m, t in zip(self.batches, self.recordings, self.masks, self.token_roles)]
        return torch.cat(runs, dim=1)[:, self.order]

    def mean_metric(self, **keep) -> float:
        """Mean logit diff over the prompts with `keep` (see patched_metric); no keep = the clean run."""
        return self.prompt_metrics(**keep).mean().item()

    def edge_scores(self, by_role: bool = False, ig_steps: int | None = None) -> torch.Tensor:
        """Mean ranking score per edge over the prompts (EAP, or EAP-IG with `ig_steps`): [U, V], or by
        token role [U, V, R] (R = len(self.roles); its sum over roles is the [U, V] score)."""
        total = sum(edge_attribution(self.prepared, b, r, t if by_role else None, m, ig_steps, len(self.roles))
                    for b, r, m, t in zip(self.batches, self.recordings, self.masks, self.token_roles))
        return total / self.n_prompts

    def role_sequences(self) -> list[torch.Tensor]:
        """Each prompt's token roles [p] (indices into self.roles), in batch order."""
        return [prompt for roles in self.token_roles for prompt in roles]

    def head_patching_effects(self, max_tokens: int = 16384) -> torch.Tensor:
        """Exact single-head patching: mean metric with one head patched minus the clean metric, per head
        [L, H]; 0 for dead heads (patching them changes nothing on these runs). Many heads per forward, at
        most `max_tokens` tokens each (`head_patched_metrics`)."""
        layout = self.prepared.layout
        clean = self.mean_metric()
        live = (~self.dead_heads).nonzero()  # [K, 2] (layer, head)
        runs = [head_patched_metrics(self.prepared, b, r, live, m, max_tokens)
                for b, r, m in zip(self.batches, self.recordings, self.masks)]
        patched = torch.cat(runs, dim=1)[:, self.order]  # [K, n] prompt order
        effects = torch.zeros(layout.n_layers, layout.n_heads)
        for (layer, head), metrics in zip(live.tolist(), patched):
            effects[layer, head] = metrics.mean().item() - clean
        return effects

    def edges_touching_dead_heads(self) -> torch.Tensor:
        """[U, V] bool: edges out of or into a dead head (no components: never counted, always computed)."""
        layout = self.prepared.layout
        dead_rows = torch.zeros(layout.n_rows + 1, dtype=torch.bool)
        for layer, head in self.dead_heads.nonzero().tolist():
            dead_rows[layout.head_row(layer, head)] = True
        return dead_rows[:-1, None] | dead_rows[column_rows(layout)][None, :]


def head_scores(edge_scores: torch.Tensor, layout: ComponentLayout) -> torch.Tensor:
    """Node EAP score of every head, the sum of its out-edges' scores.  [U, V] -> [L, H]."""
    rows = [layout.head_row(layer, 0) + h for layer in range(layout.n_layers) for h in range(layout.n_heads)]
    return edge_scores[rows].sum(1).view(layout.n_layers, layout.n_heads)


def _check_effect(kind: str, full: float, empty: float) -> None:
    if abs(full - empty) < 1e-6:
        raise CircuitError(f"patching every {kind} leaves the metric at {full:.4g}: the corruption does not "
                           "change this model's answer on these prompts, so no effect can be explained")


def _traced_curve(prompt_set: PromptSet, metrics_for: Callable[[list[int]], torch.Tensor],
                  carrying_of: Callable[[int], int], total: int, metric_full: float, config: ComponentCircuitConfig,
                  kind: str, top: list[tuple[str, float]]) -> Curve:
    """Evaluate a curve (metrics_for(counts): per-prompt metrics [K, n] with the top k kept, for each count) and
    read it."""
    per_prompt: dict[int, torch.Tensor] = {}

    def metrics(counts: list[int]) -> list[torch.Tensor]:
        new = [k for k in dict.fromkeys(counts) if k not in per_prompt]
        if new:
            per_prompt.update(zip(new, metrics_for(new)))
        return [per_prompt[k] for k in counts]

    empty = metrics([0])[0].mean().item()
    _check_effect(kind, metric_full, empty)

    def effects_of(counts: list[int]) -> list[float]:
        return [explained_effect(m.mean().item(), metric_full, empty) for m in metrics(counts)]

    first, stays, effects = read_curve(lambda k: effects_of([k])[0], count_grid(total, config.curve_points),
                                       config.target, config.dense_points, config.refine, effects_of)
    carrying = {k: carrying_of(k) for k in effects}
    return Curve(total, list(effects), list(effects.values()), None if first is None else carrying[first],
                 None if stays is None else carrying[stays], metric_full, empty, top, list(carrying.values()),
                 [m.tolist() for m in metrics(list(effects))])


def head_curve(prompt_set: PromptSet, scores: torch.Tensor, metric_clean: float,
               config: ComponentCircuitConfig) -> Curve:
    """Explained effect with the top-k live heads by |score| [L, H] kept (others patched); MLPs and dead
    heads always computed."""
    layout = prompt_set.prepared.layout
    live = ~prompt_set.dead_heads
    names = [f"blocks.{layer}.head.{h}" for layer in range(layout.n_layers) for h in range(layout.n_heads)]
    top = _ranked(scores.masked_fill(~live, 0).flatten(), min(config.top_stored, int(live.sum())), names.__getitem__)
    def metrics_for(counts: list[int]) -> torch.Tensor:
        return torch.stack([prompt_set.prompt_metrics(keep_heads=top_k_mask(scores, live, k) | ~live) for k in counts])

    return _traced_curve(prompt_set, metrics_for, lambda k: k, int(live.sum()), metric_clean, config, "head", top)


def edge_curve(prompt_set: PromptSet, edge_scores: torch.Tensor, metric_clean: float,
               config: ComponentCircuitConfig) -> Curve:
    """Explained effect with the top-k edges by |score| kept (all others patched; edges touching dead heads
    always computed, never counted).  edge_scores [U, V], or [U, V, R] for edges resolved by token role
    (prompt_set.roles)."""
    layout = prompt_set.prepared.layout
    background = layout.allowed() & prompt_set.edges_touching_dead_heads()
    countable = layout.allowed() & ~background
    if edge_scores.dim() == 3:
        countable = countable[:, :, None].expand(edge_scores.shape).contiguous()
        background = background[:, :, None].expand(edge_scores.shape)
    total = int(countable.sum())
    rows, cols = layout.row_names(), layout.col_names()
    by_role = edge_scores.dim() == 3
    roles = prompt_set.roles if by_role else [""]

    def name(i: int) -> str:  # by role: "blocks.0.head.1@S2 -> blocks.1.mlp@S2"
        edge, role = divmod(i, len(roles))
        where = f"@{roles[role]}" if by_role else ""
        return f"{rows[edge // layout.n_cols]}{where} -> {cols[edge % layout.n_cols]}{where}"

    mask_of = functools.lru_cache(maxsize=None)(top_k_masks(edge_scores, countable))  # sorted once, each k built once

    def carrying(k: int) -> int:
        kept = mask_of(k)
        live = live_role_edges(kept, layout, prompt_set.role_sequences()) if by_role else live_edges(kept, layout)
        return int(live.sum())

    top = _ranked(edge_scores.masked_fill(~countable, 0).flatten(), min(config.top_stored, total), name)
    def metrics_for(counts: list[int]) -> torch.Tensor:  # many curve points per forward
        keeps = torch.stack([mask_of(k) | background for k in counts])
        return prompt_set.edge_metrics(keeps, config.edge_batch_tokens)

    return _traced_curve(prompt_set, metrics_for, carrying, total, metric_clean, config, "edge", top)


def ranking_faithfulness(prompt_set: PromptSet, edge_scores: torch.Tensor, eap_heads: torch.Tensor,
                         exact_heads: torch.Tensor, n_edges: int, seed: int, max_tokens: int = 512) -> dict:
    """Spearman correlation of ranking scores with exact single-component patching effects: EAP node scores
    of the live heads against exact head patching, and the edge scores of `n_edges` edges (half the
    top-ranked by |score|, half drawn from the rest, seeded) against patching each edge alone (several edges
    per forward, at most `max_tokens` tokens each)."""
    layout = prompt_set.prepared.layout
    live = ~prompt_set.dead_heads
    result = {"heads_eap_vs_exact": spearman(eap_heads[live].numpy(), exact_heads[live].numpy()),
              "n_heads": int(live.sum())}
    background = layout.allowed() & prompt_set.edges_touching_dead_heads()
    countable = (layout.allowed() & ~background).flatten().nonzero().squeeze(1)
    if n_edges == 0 or len(countable) == 0:
        return result
    order = countable[torch.sort(edge_scores.flatten()[countable].abs(), descending=True, stable=True).indices]
    n_top = min(n_edges // 2, len(order))
    rest = order[n_top:]
    drawn = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[: n_edges - n_top]]
    sample = torch.cat([order[:n_top], drawn])
    clean = prompt_set.mean_metric()
    keeps = layout.allowed().expand(len(sample), -1, -1).clone()  # [K, U, V]: copy k removes sample[k] alone
    keeps.view(len(sample), -1)[torch.arange(len(sample)), sample] = False
    exact = (prompt_set.edge_metrics(keeps, max_tokens).mean(1) - clean).tolist()
    scores = edge_scores.flatten()[sample].numpy()
    result.update(edges_vs_exact=spearman(scores, np.array(exact)), n_edges=len(sample),
                  edges_top_vs_exact=spearman(scores[:n_top], np.array(exact[:n_top])), n_edges_top=n_top)
    return result


# --------------------------------------------------------------------------------------------------
# Runs and dense vs sparse comparisons


def run(config: ComponentCircuitConfig, model: nn.Module, tokenizer, prompts: Sequence[TaskPrompt],
        gates: str | None = None) -> CircuitResult:
    """Rank heads and edges on `prompts`, then trace explained effect against the number kept, with the
    gates handled as `gates` (default config.gates) in ranking and verification alike."""
    prepared = prepare(model, config.split_qkv, config.gate_gradient, gates or config.gates, config.precision)
    return run_prepared(config, prepared, tokenizer, prompts)


def gate_modes(config: ComponentCircuitConfig, model: nn.Module) -> list[str]:
    """The gate modes a model is traced with: config.gates first (the headline), then the other one with
    `other_gates`; one mode for a model without hard gates (both modes are the same function there)."""
    if gate_mode(model) != "eval" or not config.other_gates:
        return [config.gates]
    return [config.gates, *(mode for mode in GATE_MODES if mode != config.gates)]


def run_prepared(config: ComponentCircuitConfig, prepared: PreparedModel, tokenizer, prompts: Sequence[TaskPrompt],
                 faithfulness: bool = True, min_gap: float | None = None) -> CircuitResult:
    """`run` on a model already prepared (with config's split_qkv and gate_gradient and a gate mode), so
    callers that trace several prompt sets copy the model once. `faithfulness`: also compare the rankings
    with exact patching; `min_gap`: refuse (CircuitError "dropped: ...") a prompt set whose mean clean -
    corrupted logit diff is under it."""
    if not prompts:
        raise CircuitError("component circuits need at least one prompt")
    if prepared.precision != config.precision:
        raise CircuitError(f"the model was prepared for precision {prepared.precision!r}, the config asks for "
                           f"{config.precision!r}; prepare it with precision=config.precision")
    seconds: dict[str, float] = {}  # CPU seconds per phase

    def timed(phase: str, fn: Callable):
        start = time.process_time()
        out = fn()
        seconds[phase] = seconds.get(phase, 0.0) + time.process_time() - start
        return out

    with autocast(config.precision, next(prepared.module.parameters()).device):  # logits come out fp32
        prompt_set = timed("record", lambda: PromptSet(prepared, encode_prompts(prompts, tokenizer, config.batch_size)))
        metric_clean = prompt_set.prompt_clean.mean().item()
        gap = metric_clean - prompt_set.metric_corrupted
        if min_gap is not None and abs(gap) < min_gap:
            raise CircuitError(f"dropped: clean - corrupted logit diff {gap:.3g} is under the floor {min_gap}")
        ig_steps = config.ig_steps if config.edge_ranking == "eap_ig" else None
        role_scores = timed("edge_ranking", lambda: prompt_set.edge_scores(True, ig_steps)) if config.role_edges else None
        scores = role_scores.sum(-1) if config.role_edges else timed(
            "edge_ranking", lambda: prompt_set.edge_scores(False, ig_steps))  # [U, V]
        layout = prepared.layout
        eap_heads = head_scores(scores, layout)  # [L, H]
        exact_heads = (timed("head_patching", prompt_set.head_patching_effects)
                       if config.head_ranking == "exact" or faithfulness else None)
        heads = timed("heads_curve", lambda: head_curve(
            prompt_set, exact_heads if config.head_ranking == "exact" else eap_heads, metric_clean, config))
        edges = timed("edges_curve", lambda: edge_curve(prompt_set, scores, metric_clean, config))
        role_edges = None if role_scores is None else timed(
            "role_edges_curve", lambda: edge_curve(prompt_set, role_scores, metric_clean, config))
        checked = timed("faithfulness", lambda: ranking_faithfulness(
            prompt_set, scores, eap_heads, exact_heads, config.faithfulness_edges, config.seed,
            config.edge_batch_tokens)) if faithfulness else None
        names = layout.row_names()
        return CircuitResult(
            task=prompts[0].task, n_prompts=prompt_set.n_prompts, metric_clean=metric_clean,
            metric_corrupted=prompt_set.metric_corrupted, heads=heads, edges=edges, config=config.model_dump(),
            role_edges=role_edges, roles=prompt_set.roles,
            gates=prepared.gates, accuracy_clean=(prompt_set.prompt_clean > 0).float().mean().item(),
            dead_heads=[names[layout.head_row(layer, h)] for layer, h in prompt_set.dead_heads.nonzero().tolist()],
            faithfulness=checked, cpu_seconds=seconds,
        )


def run_per_prompt(config: ComponentCircuitConfig, model: nn.Module, tokenizer, prompts: Sequence[TaskPrompt],
                   gates: str | None = None) -> list[CircuitResult | str]:
    """One circuit per prompt (its own ranking and patching curves): its CircuitResult, or why it has none
    (its clean - corrupted gap is under config.min_prompt_gap: "dropped: ...", or the corruption does not
    move that prompt's metric). Per-prompt sizes give intervals over prompts."""
    prepared = prepare(model, config.split_qkv, config.gate_gradient, gates or config.gates, config.precision)
    return run_prepared_per_prompt(config, prepared, tokenizer, prompts)


def run_prepared_per_prompt(config: ComponentCircuitConfig, prepared: PreparedModel, tokenizer,
                            prompts: Sequence[TaskPrompt]) -> list[CircuitResult | str]:
    """`run_per_prompt` on a model already prepared: one copy of the model serves every prompt."""
    results: list[CircuitResult | str] = []
    for prompt in prompts:
        try:
            results.append(run_prepared(config, prepared, tokenizer, [prompt], faithfulness=False,
                                        min_gap=config.min_prompt_gap))
        except CircuitError as error:
            results.append(str(error))
    return results


def behaviour(result: CircuitResult, config: ComponentCircuitConfig) -> str | None:
    """Why a model does not do the task (mean clean logit diff or clean accuracy under the config's
    thresholds), or None if it does."""
    if result.metric_clean < config.min_clean_logit_diff:
        return f"mean clean logit diff {result.metric_clean:.3g} < {config.min_clean_logit_diff}"
    if result.accuracy_clean < config.min_clean_accuracy:
        return f"clean accuracy {result.accuracy_clean:.3g} < {config.min_clean_accuracy}"
    return None


def compare_per_prompt(dense: Sequence[CircuitResult | str], sparse: Sequence[CircuitResult | str],
                       samples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Per kind, over the prompts whose dense and sparse circuits both reach the target: the counts, their
    means, and mean(dense) / mean(sparse) with a percentile-bootstrap CI (prompts resampled in pairs); and
    how many prompts each model dropped for a clean - corrupted gap under the floor."""
    if len(dense) != len(sparse):
        raise CircuitError(f"{len(dense)} dense but {len(sparse)} sparse per-prompt circuits: they pair by prompt")
    rng = np.random.default_rng(seed)
    summary: dict = {"n_prompts": len(dense), "confidence": confidence,
                     "dropped_small_gap": {name: sum(isinstance(r, str) and r.startswith("dropped:") for r in results)
                                           for name, results in (("dense", dense), ("sparse", sparse))}}
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


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return np.nan, np.nan
    alpha = (1 - confidence) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def pooled_count_intervals(dense: Curve, sparse: Curve, target: float, samples: int, confidence: float,
                           rng: np.random.Generator) -> dict:
    """Percentile-bootstrap CIs of the pooled counts and their dense/sparse ratio: prompts resampled (the
    same draw for both models, which ran the same prompts), each curve re-read from its per-prompt metrics
    at the evaluated counts (the ranking and the evaluated counts stay those of the full prompt set)."""
    n = len(dense.prompt_metrics[0])
    if len(sparse.prompt_metrics[0]) != n:
        raise CircuitError(f"dense ran {n} prompts, sparse {len(sparse.prompt_metrics[0])}: they pair by prompt")
    prompts = rng.integers(0, n, size=(samples, n))
    d = readings(np.array(dense.prompt_metrics), dense.counts, dense.carrying, target, prompts)
    s = readings(np.array(sparse.prompt_metrics), sparse.counts, sparse.carrying, target, prompts)
    out = {}
    for index, reading in enumerate(("first", "stays_above")):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = d[index] / s[index]
        for name, values in (("dense", d[index]), ("sparse", s[index]), ("ratio", ratios)):
            out[f"{name}_{reading}_ci"] = _interval(values, confidence)
    return out


def compare(dense: CircuitResult, sparse: CircuitResult, samples: int | None = None, confidence: float = 0.95
            ) -> dict:
    """Dense / sparse ratio of the heads and edges needed to reach the target explained effect, for the
    first crossing and for the count from which the curve stays above the target, with bootstrap CIs over
    prompts (`pooled_count_intervals`; `samples` default the config's). Behaviour gate: the ratios are
    None unless both models do the task (`behaviour`); `behaviour_gate` says why not."""
    config = ComponentCircuitConfig.model_validate(dense.config)
    reasons = {name: behaviour(result, config) for name, result in (("dense", dense), ("sparse", sparse))}
    failed = "; ".join(f"{name}: {why}" for name, why in reasons.items() if why)
    summary: dict = {"task": dense.task, "target": config.target, "gates": sparse.gates,
                     "behaviour_gate": failed or "passed",
                     "behaviour": {name: {"metric_clean": r.metric_clean, "accuracy_clean": r.accuracy_clean}
                                   for name, r in (("dense", dense), ("sparse", sparse))}}
    rng = np.random.default_rng(config.seed)

    def ratio(a: int | None, b: int | None) -> float | None:
        return None if failed or a is None or b is None or b == 0 else a / b

    for kind in CURVE_KINDS:
        d, s = getattr(dense, kind), getattr(sparse, kind)
        if d is None or s is None:
            continue
        summary[kind] = {
            "dense": d.count_at_target, "sparse": s.count_at_target, "ratio": ratio(d.count_at_target, s.count_at_target),
            "dense_stays_above": d.count_stays_above, "sparse_stays_above": s.count_stays_above,
            "ratio_stays_above": ratio(d.count_stays_above, s.count_stays_above),
        }
        if d.prompt_metrics and s.prompt_metrics:
            intervals = pooled_count_intervals(d, s, config.target, samples or config.bootstrap_samples, confidence,
                                               rng)
            if failed:
                intervals = {k: v for k, v in intervals.items() if not k.startswith("ratio")}
            summary[kind].update(intervals)
    return summary
