"""Summaries over prompts: per-task means with bootstrap CIs and paired dense/sparse ratios of the graph
metrics, and component circuits per task (one over the task's prompts, and one per prompt) as tables.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from circuits.config import CURVE_KINDS, CircuitError
from circuits.curves import run_prepared, run_prepared_per_prompt
from circuits.hooks import prepare
from circuits.stats import bootstrap_mean, bootstrap_ratio
from comparison.config import PAPER_RATIOS, PAPER_TASKS, RATIO, CircuitsConfig
from prompts.tasks import TaskError, invalid_reason, load_task

# --------------------------------------------------------------------------------------------------
# Graph metrics per task


def summarize(metrics: pd.DataFrame, columns: list[str], samples: int, confidence: float, seed: int) -> pd.DataFrame:
    """Per task (and "all"), per metric: each variant's mean and CI over its graphs, and the paired
    dense/sparse ratio over the pairs (same task and prompt) present in both. Each (task, metric) has its own
    generator seeded from (seed, task, metric), so a row does not depend on which others exist."""
    rows = []
    tasks = sorted(metrics["task"].unique())
    for task in [*tasks, "all"] if len(tasks) > 1 else tasks:
        part = metrics if task == "all" else metrics[metrics["task"] == task]
        for column in columns:
            rng = np.random.default_rng([seed, zlib.crc32(f"{task}:{column}".encode())])
            for variant in sorted(part["variant"].unique()):
                values = part.loc[part["variant"] == variant, column].dropna().to_numpy()
                rows.append((task, column, variant, len(values), *bootstrap_mean(values, samples, confidence, rng)))
            wide = part.pivot_table(index="pair", columns="variant", values=column, aggfunc="first")
            if {"dense", "sparse"} <= set(wide.columns):
                paired = wide[["dense", "sparse"]].dropna()
                rows.append((task, column, RATIO, len(paired), *bootstrap_ratio(
                    paired["dense"].to_numpy(), paired["sparse"].to_numpy(), samples, confidence, rng)))
    return pd.DataFrame(rows, columns=["task", "metric", "variant", "n", "mean", "ci_low", "ci_high"])


# --------------------------------------------------------------------------------------------------
# Component circuits per task


def task_prompts(task: str, tokenizer, n: int) -> tuple[list[int], list, str | None]:
    """The first n prompts of the task's set that fit `tokenizer` with their indices in the set, and why none
    fit (None if some do)."""
    prompts = load_task(task)[:n]
    fitting = [(i, p) for i, p in enumerate(prompts) if invalid_reason(p, tokenizer) is None]
    if fitting:
        return [i for i, _ in fitting], [p for _, p in fitting], None
    return [], [], f"no prompt of {task} fits this tokenizer ({invalid_reason(prompts[0], tokenizer)})"


def circuit_tables(results: dict[str, dict[str, object]], errors: dict[str, str], target: float
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curves, summary) from component circuit results {task: {variant: CircuitResult}} and per-task errors.

    curves: task, variant, kind (heads | edges | position_edges), count, explained_effect, total, n_prompts.
    summary: per task and kind the counts reaching `target` (first crossing and stays-above), their
    dense/sparse ratio, and the paper's range; `status` says why a task has no numbers."""
    curve_rows, summary_rows = [], []
    kinds = [kind for kind in CURVE_KINDS
             if any(getattr(r, kind) is not None for by_variant in results.values() for r in by_variant.values())]
    for task, by_variant in sorted(results.items()):
        for variant, result in sorted(by_variant.items()):
            for kind in kinds:
                curve = getattr(result, kind)
                curve_rows += [] if curve is None else [
                    (task, variant, kind, count, effect, curve.total, result.n_prompts)
                    for count, effect in zip(curve.counts, curve.effects)]
        for kind in kinds:
            row = {"task": task, "kind": kind, "target": target, "status": "ok"}
            for variant in ("dense", "sparse"):
                curve = getattr(by_variant[variant], kind) if variant in by_variant else None
                row[f"{variant}_count"] = None if curve is None else curve.count_at_target
                row[f"{variant}_stays_above"] = None if curve is None else curve.count_stays_above
                row[f"{variant}_total"] = None if curve is None else curve.total
            row["ratio"] = _ratio(row["dense_count"], row["sparse_count"])
            row["ratio_stays_above"] = _ratio(row["dense_stays_above"], row["sparse_stays_above"])
            summary_rows.append(row)
    for task, error in sorted(errors.items()):
        summary_rows += [{"task": task, "kind": kind, "target": target, "status": error} for kind in kinds or ("heads", "edges")]
    summary = pd.DataFrame(summary_rows, columns=[
        "task", "kind", "target", "dense_count", "sparse_count", "ratio", "dense_stays_above", "sparse_stays_above",
        "ratio_stays_above", "dense_total", "sparse_total", "status"])
    summary["paper_ratio_min"] = summary["kind"].map(lambda k: PAPER_RATIOS[k][0])
    summary["paper_ratio_max"] = summary["kind"].map(lambda k: PAPER_RATIOS[k][1])
    summary["paper_tasks"] = PAPER_TASKS
    for column in ("dense_count", "sparse_count", "dense_stays_above", "sparse_stays_above", "dense_total",
                   "sparse_total"):
        summary[column] = summary[column].astype("Int64")
    summary[["ratio", "ratio_stays_above"]] = summary[["ratio", "ratio_stays_above"]].astype(float)
    curves = pd.DataFrame(curve_rows, columns=["task", "variant", "kind", "count", "explained_effect", "total",
                                               "n_prompts"])
    return curves, summary


def _ratio(dense, sparse) -> float | None:
    return None if dense is None or sparse is None or sparse == 0 else dense / sparse


PROMPT_COLUMNS = ["task", "variant", "prompt_index", "kind", "count_at_target", "count_stays_above", "total",
                  "metric_clean", "metric_corrupted", "status"]


def prompt_circuit_rows(task: str, variant: str, indices: Sequence[int], results: Sequence) -> list[tuple]:
    """Rows of `circuit_prompts` for one task and variant: per prompt (CircuitResult, or why it has none)
    and curve kind, the count reaching the target."""
    rows = []
    for index, result in zip(indices, results):
        if isinstance(result, str):
            rows.append((task, variant, index, None, None, None, None, None, None, result))
            continue
        rows += [(task, variant, index, kind, curve.count_at_target, curve.count_stays_above, curve.total,
                  result.metric_clean, result.metric_corrupted, "ok")
                 for kind in CURVE_KINDS if (curve := getattr(result, kind)) is not None]
    return rows


def prompt_circuit_ratios(prompts: pd.DataFrame, samples: int, confidence: float, seed: int) -> pd.DataFrame:
    """Per task and kind, over the prompts whose dense and sparse circuits both reach the target: their number,
    the mean counts and mean(dense) / mean(sparse) with a percentile-bootstrap CI (prompts resampled in pairs;
    each (task, kind) has its own generator seeded from (seed, task, kind))."""
    columns = ["task", "kind", "prompt_pairs", "dense_prompt_mean", "sparse_prompt_mean", "prompt_ratio",
               "prompt_ratio_ci_low", "prompt_ratio_ci_high"]
    rows = []
    for (task, kind), part in prompts.dropna(subset=["kind"]).groupby(["task", "kind"], sort=True):
        reached = part[part["count_at_target"].notna()]
        paired = reached.pivot(index="prompt_index", columns="variant", values="count_at_target")
        paired = paired.reindex(columns=["dense", "sparse"]).dropna()
        dense, sparse = paired["dense"].to_numpy(np.float64), paired["sparse"].to_numpy(np.float64)
        rng = np.random.default_rng([seed, zlib.crc32(f"{task}:{kind}".encode())])
        rows.append((task, kind, len(paired), dense.mean() if len(dense) else np.nan,
                     sparse.mean() if len(sparse) else np.nan, *bootstrap_ratio(dense, sparse, samples, confidence, rng)))
    return pd.DataFrame(rows, columns=columns)


def run_circuits(config: CircuitsConfig, models: Mapping[str, tuple], tasks: list[str], samples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Component circuits of each task on each model {variant: (model, tokenizer)}: (curves, summary, prompts).
    One circuit per task over its prompts; with `config.per_prompt` also one per prompt (`prompts`, one row per
    prompt, variant and kind; None otherwise), whose dense/sparse ratio of mean counts and its CI join the summary.
    A task whose prompts do not fit a tokenizer, or whose corruption moves no metric, gets a status row."""
    circuit = config.circuit
    prepared = {variant: prepare(model, circuit.split_qkv, circuit.gate_gradient, circuit.precision)
                for variant, (model, _) in models.items()}  # one copy per model for every task and prompt
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    prompt_rows: list[tuple] = []
    for task in tasks:
        try:
            by_variant, rows = {}, []
            for variant, (_, tokenizer) in models.items():
                indices, prompts, reason = task_prompts(task, tokenizer, config.prompts_per_task)
                if reason:
                    raise TaskError(reason)
                by_variant[variant] = run_prepared(circuit, prepared[variant], tokenizer, prompts)
                if config.per_prompt:
                    rows += prompt_circuit_rows(task, variant, indices, run_prepared_per_prompt(
                        circuit, prepared[variant], tokenizer, prompts))
            results[task] = by_variant
            prompt_rows += rows
        except (CircuitError, TaskError) as error:
            errors[task] = f"{variant}: {error}"
    curves, summary = circuit_tables(results, errors, circuit.target)
    if not config.per_prompt:
        return curves, summary, None
    prompts = pd.DataFrame(prompt_rows, columns=PROMPT_COLUMNS)
    for column in ("count_at_target", "count_stays_above", "total"):
        prompts[column] = prompts[column].astype("Int64")
    ratios = prompt_circuit_ratios(prompts, samples, confidence, seed)
    summary = summary.merge(ratios, on=["task", "kind"], how="left")
    summary["prompt_pairs"] = summary["prompt_pairs"].astype("Int64")
    return curves, summary, prompts
