"""Summaries over prompts: per-task means with bootstrap CIs and paired dense/sparse ratios of the graph
metrics, and component circuits per task (one over the task's prompts, and one per prompt) as tables.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from circuits.config import CURVE_KINDS, CircuitError, ComponentCircuitConfig
from circuits.curves import compare, gate_modes, run_prepared, run_prepared_per_prompt
from circuits.hooks import prepare
from circuits.stats import bootstrap_mean, bootstrap_ratio
from comparison.config import PAPER_RATIOS, PAPER_TASKS, RATIO, CircuitsConfig
from prompts.tasks import TaskError, invalid_reason, load_task
from sparse_attention.gated_attention import gate_mode

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


SUMMARY_COLUMNS = [
    "task", "gates", "headline", "kind", "target", "dense_count", "sparse_count", "ratio", "ratio_ci_low",
    "ratio_ci_high", "dense_stays_above", "sparse_stays_above", "ratio_stays_above", "ratio_stays_above_ci_low",
    "ratio_stays_above_ci_high", "dense_total", "sparse_total", "behaviour_gate", "dense_metric_clean",
    "sparse_metric_clean", "dense_accuracy_clean", "sparse_accuracy_clean", "dense_faithfulness",
    "sparse_faithfulness", "status"]


def _faithfulness(result, kind: str) -> float | None:
    """The Spearman correlation of a curve kind's ranking with exact patching (edges: the sampled edges)."""
    found = result.faithfulness or {}
    value = found.get("heads_eap_vs_exact" if kind == "heads" else "edges_vs_exact")
    return None if kind == "role_edges" or value is None else float(value)


def circuit_tables(results: dict[str, dict[str, dict[str, object]]], errors: dict[str, str], config: ComponentCircuitConfig,
                   samples: int = 2000, confidence: float = 0.95) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(curves, summary) from component circuit results {task: {gates: {variant: CircuitResult}}} and per-task
    errors.

    curves: task, gates, variant, kind (heads | edges | role_edges), count (ranked components kept),
    carrying (those on a path to the logits; heads: live heads kept), explained_effect, total, n_prompts.
    summary: per task, gate mode and kind the counts reaching the target (first crossing and stays-above, in
    carrying units) with their dense/sparse ratios and bootstrap CIs (`circuits.curves.compare`), the behaviour
    gate (ratios only where both models do the task), each model's clean metric and accuracy, the ranking's
    faithfulness (Spearman with exact patching), the paper's range; `status` says why a task has no numbers."""
    curve_rows, summary_rows = [], []
    kinds = [kind for kind in CURVE_KINDS if any(getattr(r, kind) is not None for by_mode in results.values()
                                                 for by_variant in by_mode.values() for r in by_variant.values())]
    for task, by_mode in sorted(results.items()):
        for gates, by_variant in by_mode.items():
            for variant, result in sorted(by_variant.items()):
                for kind in kinds:
                    curve = getattr(result, kind)
                    curve_rows += [] if curve is None else [
                        (task, gates, variant, kind, count, carrying, effect, curve.total, result.n_prompts)
                        for count, carrying, effect in zip(curve.counts, curve.carrying, curve.effects)]
            comparison = (compare(by_variant["dense"], by_variant["sparse"], samples, confidence)
                          if len(by_variant) == 2 else {})
            for kind in kinds:
                row = {"task": task, "gates": gates, "headline": gates == config.gates, "kind": kind,
                       "target": config.target, "status": "ok",
                       "behaviour_gate": comparison.get("behaviour_gate", "needs both models")}
                for variant in ("dense", "sparse"):
                    result = by_variant.get(variant)
                    curve = None if result is None else getattr(result, kind)
                    row[f"{variant}_count"] = None if curve is None else curve.count_at_target
                    row[f"{variant}_stays_above"] = None if curve is None else curve.count_stays_above
                    row[f"{variant}_total"] = None if curve is None else curve.total
                    row[f"{variant}_metric_clean"] = None if result is None else result.metric_clean
                    row[f"{variant}_accuracy_clean"] = None if result is None else result.accuracy_clean
                    row[f"{variant}_faithfulness"] = None if result is None else _faithfulness(result, kind)
                found = comparison.get(kind, {})
                row["ratio"], row["ratio_stays_above"] = found.get("ratio"), found.get("ratio_stays_above")
                for reading, column in (("first", "ratio"), ("stays_above", "ratio_stays_above")):
                    low, high = found.get(f"ratio_{reading}_ci", (None, None))
                    row[f"{column}_ci_low"], row[f"{column}_ci_high"] = low, high
                summary_rows.append(row)
    for task, error in sorted(errors.items()):
        summary_rows += [{"task": task, "gates": config.gates, "headline": True, "kind": kind, "target": config.target,
                          "status": error} for kind in kinds or ("heads", "edges")]
    summary = pd.DataFrame(summary_rows, columns=SUMMARY_COLUMNS)
    summary["paper_ratio_min"] = summary["kind"].map(lambda k: PAPER_RATIOS[k][0])
    summary["paper_ratio_max"] = summary["kind"].map(lambda k: PAPER_RATIOS[k][1])
    summary["paper_tasks"] = PAPER_TASKS
    for column in ("dense_count", "sparse_count", "dense_stays_above", "sparse_stays_above", "dense_total",
                   "sparse_total"):
        summary[column] = summary[column].astype("Int64")
    floats = [c for c in SUMMARY_COLUMNS if c.startswith("ratio") or c.endswith(("_clean", "_faithfulness"))]
    summary[floats] = summary[floats].astype(float)
    summary["headline"] = summary["headline"].astype(bool)
    curves = pd.DataFrame(curve_rows, columns=["task", "gates", "variant", "kind", "count", "carrying",
                                               "explained_effect", "total", "n_prompts"])
    return curves, summary


PROMPT_COLUMNS = ["task", "gates", "variant", "prompt_index", "kind", "count_at_target", "count_stays_above",
                  "total", "metric_clean", "metric_corrupted", "status"]


def prompt_circuit_rows(task: str, gates: str, variant: str, indices: Sequence[int], results: Sequence
                        ) -> list[tuple]:
    """Rows of `circuit_prompts` for one task, gate mode and variant: per prompt (CircuitResult, or why it has
    none: "dropped: ..." for a clean - corrupted gap under the floor) and curve kind, the count reaching the
    target."""
    rows = []
    for index, result in zip(indices, results):
        if isinstance(result, str):
            rows.append((task, gates, variant, index, None, None, None, None, None, None, result))
            continue
        rows += [(task, gates, variant, index, kind, curve.count_at_target, curve.count_stays_above, curve.total,
                  result.metric_clean, result.metric_corrupted, "ok")
                 for kind in CURVE_KINDS if (curve := getattr(result, kind)) is not None]
    return rows


def prompt_circuit_ratios(prompts: pd.DataFrame, samples: int, confidence: float, seed: int) -> pd.DataFrame:
    """Per task, gate mode and kind, over the prompts whose dense and sparse circuits both reach the target:
    their number, the mean counts and mean(dense) / mean(sparse) with a percentile-bootstrap CI (prompts
    resampled in pairs; each (task, kind) has its own generator seeded from (seed, task, kind)); and how many
    prompts each model dropped for a clean - corrupted gap under the floor."""
    columns = ["task", "gates", "kind", "prompt_pairs", "dense_prompt_mean", "sparse_prompt_mean", "prompt_ratio",
               "prompt_ratio_ci_low", "prompt_ratio_ci_high", "dense_prompts_dropped", "sparse_prompts_dropped"]
    rows = []
    dropped = prompts[prompts["status"].str.startswith("dropped:")].groupby(["task", "gates", "variant"]).size()
    for (task, gates, kind), part in prompts.dropna(subset=["kind"]).groupby(["task", "gates", "kind"], sort=True):
        reached = part[part["count_at_target"].notna()]
        paired = reached.pivot(index="prompt_index", columns="variant", values="count_at_target")
        paired = paired.reindex(columns=["dense", "sparse"]).dropna()
        dense, sparse = paired["dense"].to_numpy(np.float64), paired["sparse"].to_numpy(np.float64)
        rng = np.random.default_rng([seed, zlib.crc32(f"{task}:{kind}".encode())])
        rows.append((task, gates, kind, len(paired), dense.mean() if len(dense) else np.nan,
                     sparse.mean() if len(sparse) else np.nan, *bootstrap_ratio(dense, sparse, samples, confidence, rng),
                     *(int(dropped.get((task, gates, variant), 0)) for variant in ("dense", "sparse"))))
    return pd.DataFrame(rows, columns=columns)


def run_circuits(config: CircuitsConfig, models: Mapping[str, tuple], tasks: list[str], samples: int = 2000,
                 confidence: float = 0.95, seed: int = 0, progress: bool = False
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """Component circuits of each task on each model {variant: (model, tokenizer)}: (curves, summary, prompts).
    Per gate mode (`circuits.curves.gate_modes` of the sparse model: the headline first; a model without gates
    is traced once and serves every mode): one circuit per task over its prompts; with `config.per_prompt`
    also one per prompt (`prompts`, one row per prompt, mode, variant and kind; None otherwise), whose
    dense/sparse ratio of mean counts and its CI join the summary. A task whose prompts do not fit a
    tokenizer, or whose corruption moves no metric, gets a status row. `progress` shows a bar over the
    (task, model, gate mode) circuits traced."""
    circuit = config.circuit
    modes = gate_modes(circuit, models["sparse"][0]) if "sparse" in models else [circuit.gates]
    prepared = {(variant, mode): prepare(model, circuit.split_qkv, circuit.gate_gradient, mode, circuit.precision)
                for variant, (model, _) in models.items()  # one copy per model and mode for every task and prompt
                for mode in (modes if gate_mode(model) == "eval" else modes[:1])}
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}
    prompt_rows: list[tuple] = []
    bar = tqdm(total=len(tasks) * len(prepared), desc="component circuits", unit="circuit", disable=not progress)
    for task in tasks:
        try:
            by_mode: dict[str, dict] = {mode: {} for mode in modes}
            rows = []
            for variant, (_, tokenizer) in models.items():
                indices, prompts, reason = task_prompts(task, tokenizer, config.prompts_per_task)
                if reason:
                    raise TaskError(reason)
                done: dict = {}
                for mode in modes:
                    key = (variant, mode) if (variant, mode) in prepared else (variant, modes[0])
                    if key not in done:
                        bar.set_postfix_str(f"{task} {variant} {mode}")
                        done[key] = run_prepared(circuit, prepared[key], tokenizer, prompts), (
                            run_prepared_per_prompt(circuit, prepared[key], tokenizer, prompts)
                            if config.per_prompt else None)
                        bar.update()
                    pooled, per_prompt = done[key]
                    by_mode[mode][variant] = pooled
                    if per_prompt is not None:
                        rows += prompt_circuit_rows(task, mode, variant, indices, per_prompt)
            results[task] = by_mode
            prompt_rows += rows
        except (CircuitError, TaskError) as error:
            errors[task] = f"{variant}: {error}"
    bar.close()
    curves, summary = circuit_tables(results, errors, circuit, samples, confidence)
    if not config.per_prompt:
        return curves, summary, None
    prompts = pd.DataFrame(prompt_rows, columns=PROMPT_COLUMNS)
    for column in ("count_at_target", "count_stays_above", "total"):
        prompts[column] = prompts[column].astype("Int64")
    ratios = prompt_circuit_ratios(prompts, samples, confidence, seed)
    summary = summary.merge(ratios, on=["task", "gates", "kind"], how="left")
    for column in ("prompt_pairs", "dense_prompts_dropped", "sparse_prompts_dropped"):
        summary[column] = summary[column].astype("Int64")
    return curves, summary, prompts
