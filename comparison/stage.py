"""Dense vs sparse circuits over many prompts (stage 4): metrics of every graph in a store, per-task
means with bootstrap CIs and paired dense/sparse ratios, and component circuits (heads, edges) per task.

Feature level: `graph_metrics` per graph, from the store's tables only. Per task (and "all"), per metric:
mean over graphs and a seeded percentile-bootstrap CI per variant, and the paired ratio mean(dense) /
mean(sparse) over prompts attributed on both, bootstrapped over pairs (`summaries.summarize`).
Component level: `circuits` on the dense and the sparse model, per task: one circuit over the task's
prompts, and (`per_prompt`) one per prompt, whose paired ratio of mean counts has a CI
(`summaries.run_circuits`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attribution.store import open_store
from comparison.config import OUTPUT_FILES, RATIO, CompareConfig, save_compare_config
from comparison.graph_metrics import metric_columns, store_metrics
from comparison.inputs import attention_pattern, example_tables, sparsity_table
from comparison.report import write_report
from comparison.summaries import run_circuits, summarize
from sparse_attention.architectures import architecture
from sparse_attention.sources import load_source


def write_table(frame: pd.DataFrame, output_dir: Path, name: str) -> Path:
    """One comparison table as Parquet, written under a temporary name and moved into place."""
    path = output_dir / OUTPUT_FILES[name]
    tmp = path.with_suffix(".parquet.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def compare_store(store_uri: str | Path, output_dir: str | Path, config: CompareConfig | None = None, *,
                  dense_model=None, sparse_model: str | Path | None = None, sparsify_metrics: str | Path | None = None,
                  labels: Mapping[str, Mapping[tuple[int, int], str]] | None = None,
                  progress: bool = True) -> dict:
    """Compare the dense and sparse graphs of the store at `store_uri` into `output_dir`.

    dense_model: a ModelSpec (or gated checkpoint) for component circuits; sparse_model: the sparsify stage's
    gated model directory (component circuits and the attention-pattern figure); sparsify_metrics: its
    metrics.json (the sparsity figure). Without them those parts are left out, and so are component circuits on a
    family that refuses them (sparse_attention/architectures.py); the summary and the report say which and why.
    labels: optional feature labels per variant, {variant: {(layer, feature): text}}, for the report. Returns a summary dict.
    """
    config = config or CompareConfig()
    if config.threads:
        torch.set_num_threads(config.threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_compare_config(config, output_dir)
    store = open_store(store_uri)
    metrics, qk_edges = store_metrics(store, config, progress)
    summary_table = summarize(metrics, metric_columns(config), config.bootstrap_samples, config.confidence, config.seed)
    examples, example_pairs = example_tables(store, metrics)
    written = {"graph_metrics": metrics, "qk_edges": qk_edges, "task_summary": summary_table, "examples": examples,
               "example_qk_pairs": example_pairs}
    left_out = []
    if sparsify_metrics is not None:
        written["sparsity"] = sparsity_table(json.loads(Path(sparsify_metrics).read_text()))
    else:
        left_out.append("sparsity (no sparsify metrics given)")
    if sparse_model is not None:
        gated, tokenizer, _ = load_source(Path(sparse_model))
        written["attention_pattern"] = attention_pattern(gated, tokenizer, examples["prompt"].iloc[0]
                                                         if len(examples) else metrics["prompt"].iloc[0])
    else:
        left_out.append("attention pattern (no sparse model given)")
    circuit_tasks = config.circuits.tasks or sorted(t for t in metrics["task"].unique() if t != "custom")
    refusal = architecture(gated).refused.get("circuits") if sparse_model is not None else None
    if config.circuits.enabled and refusal is not None:
        left_out.append(f"component circuits: refused for model family {architecture(gated).family!r}: {refusal}")
    elif config.circuits.enabled and circuit_tasks and dense_model is not None and sparse_model is not None:
        models = {variant: load_source(source)[:2] for variant, source in (("dense", dense_model),
                                                                            ("sparse", Path(sparse_model)))}
        curves, circuit_summary, prompt_circuits = run_circuits(config.circuits, models, circuit_tasks,
                                                                config.bootstrap_samples, config.confidence, config.seed,
                                                                progress)
        written["circuit_curves"], written["circuit_summary"] = curves, circuit_summary
        if prompt_circuits is not None:
            written["circuit_prompts"] = prompt_circuits
    elif config.circuits.enabled:
        left_out.append("component circuits (need dense_model, sparse_model and a task other than custom)")
    for name, frame in written.items():
        write_table(frame, output_dir, name)
    report = None
    if config.report:
        report = str(write_report(output_dir, store_uri=store_uri, labels=labels, left_out=left_out))
    ratios = summary_table[(summary_table["variant"] == RATIO) & (summary_table["task"] != "all")]
    return {
        "graphs": len(metrics), "tasks": sorted(metrics["task"].unique()), "tables": sorted(OUTPUT_FILES[n] for n in written),
        "left_out": left_out, "report": report,
        "edges_kept_ratio": {r.task: None if np.isnan(r.mean) else r.mean
                             for r in ratios[ratios["metric"] == "n_edges_kept"].itertuples()},
    }
