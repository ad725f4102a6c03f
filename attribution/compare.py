"""Dense vs sparse circuits over many prompts (stage 4): metrics of every graph in a store, per-task
means with bootstrap CIs and paired dense/sparse ratios, and component circuits (heads, edges) per task.

Feature level, per graph (variant, task, prompt_index), from the store's tables only:
- sizes after pruning: `n_nodes_kept`, `n_edges_kept` (graphs table), `n_features_kept` (nodes table);
- `n_edges_influence_{80,90}`: edges of the pruned graph holding that share of its edge influence
  (`edge_influence`: circuit-tracer's edge score recomputed on the pruned graph);
- heads carrying the graph's edges (head_loadings, head >= 0; `head_metrics`);
- `qk_top{k}_share`: median over the graph's QK-attributed attention edges (query after BOS: a BOS query
  sees only the BOS token, so one pair explains it trivially) of the share of the edge's score explained by
  its top-k (query, key) component pairs (`qk_edge_shares`);
- replacement and completeness scores, unpruned and pruned (graphs table).

Per task (and "all"), per metric: mean over graphs and a seeded percentile-bootstrap CI per variant, and
the paired ratio mean(dense) / mean(sparse) over prompts attributed on both, bootstrapped over pairs.
Component level: `attribution.component_circuits` on the dense and the sparse model, per task: one circuit
over the task's prompts, and (`per_prompt`) one per prompt, whose paired ratio of mean counts has a CI.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from attribution.component_circuits import CURVE_KINDS, ComponentCircuitConfig
from attribution.stats import bootstrap_mean, bootstrap_ratio

OUTPUT_FILES = {
    "graph_metrics": "graph_metrics.parquet",  # one row per graph
    "qk_edges": "qk_edges.parquet",  # one row per QK-attributed attention edge of every graph
    "task_summary": "task_summary.parquet",  # per task, metric, variant (and dense/sparse): mean and CI
    "circuit_curves": "circuit_curves.parquet",  # explained effect vs heads / edges kept, per task and variant
    "circuit_summary": "circuit_summary.parquet",  # count at the target effect, dense/sparse ratio, the paper's
    "circuit_prompts": "circuit_prompts.parquet",  # per prompt, variant and kind: its own circuit's count
    "sparsity": "sparsity.parquet",  # open-edge fraction per layer and head (sparsify metrics.json)
    "attention_pattern": "attention_pattern.parquet",  # dense vs sparse attention weights of one prompt
    "examples": "examples.parquet",  # per task and variant: the drawn graph and its strongest attention edge
    "example_qk_pairs": "example_qk_pairs.parquet",  # that edge's top QK pairs, as drawn
}
CONFIG_FILE = "compare_config.yaml"
RATIO = "dense/sparse"
# The paper's component-circuit ratios at ~0.9 explained effect (PAPER.md: Greater-Than and IOI on GPT-2,
# Docstring and long IOI on OLMo-7B). Only the range over its tasks is known to us, not each task's value.
# Whether its edges are resolved by position is not known to us, so both our edge kinds sit beside its range.
PAPER_RATIOS = {"heads": (1.4, 4.5), "edges": (5.4, 97.0), "position_edges": (5.4, 97.0)}
PAPER_TASKS = "Greater-Than, IOI (GPT-2); Docstring, long IOI (OLMo-7B)"


class CompareError(ValueError):
    """A store, output or setting the comparison cannot use; the message says what to do."""


class CircuitsConfig(BaseModel):
    """Component circuits per task on the dense and the sparse model, kept cheap by a prompt count."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    prompts_per_task: int = Field(8, gt=0, description="the first n prompts of data/prompts/{task}.jsonl")
    tasks: list[str] | None = Field(None, description="tasks to run; None = the tasks of the store's graphs")
    circuit: ComponentCircuitConfig = ComponentCircuitConfig(curve_points=12)
    per_prompt: bool = Field(True, description="also trace one circuit per prompt, so the dense/sparse ratio of "
                                               "mean counts has a bootstrap CI over prompts (one more pass over "
                                               "every curve per prompt)")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        from attribution.tasks import TASKS

        unknown = [t for t in tasks or [] if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
        return tasks


class CompareConfig(BaseModel):
    """Settings of the comparison stage; saved beside its outputs."""

    model_config = ConfigDict(extra="forbid")

    influence_shares: list[float] = Field([0.8, 0.9], description="edge-influence shares counted per graph")
    head_min_share: float = Field(0.05, gt=0, le=1, description="a head carries a graph if it holds at least "
                                  "this share of the graph's head-carried |weight|")
    head_cover: float = Field(0.9, gt=0, le=1, description="count the heads holding this share of it")
    qk_top_k: list[int] = Field([1, 5, 10], description="top-k QK pairs whose share of the score is reported")
    bootstrap_samples: int = Field(2000, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    seed: int = 0
    circuits: CircuitsConfig = CircuitsConfig()
    report: bool = Field(True, description="write report.html with its PNGs")
    threads: int | None = Field(None, gt=0, description="torch threads; None = leave as is")

    @field_validator("influence_shares")
    @classmethod
    def _shares(cls, shares: list[float]) -> list[float]:
        if not shares or any(not 0 < s <= 1 for s in shares):
            raise ValueError(f"influence_shares must be in (0, 1], got {shares}")
        return shares

    @field_validator("qk_top_k")
    @classmethod
    def _top_k(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"qk_top_k must be positive counts, got {ks}")
        return ks


# --------------------------------------------------------------------------------------------------
# Metrics of one graph (pure functions over its tables)


def share_name(share: float) -> str:
    return f"{round(100 * share)}"


def count_to_share(values: np.ndarray, share: float) -> int:
    """Smallest number of the largest `values` (>= 0) whose sum reaches `share` of their total; 0 if empty."""
    values = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    total = values.sum()
    if len(values) == 0 or total <= 0:
        return 0
    cumulative = np.cumsum(values)
    return int(np.argmax(cumulative >= share * total * (1 - 1e-12))) + 1


def edge_influence(target: np.ndarray, source: np.ndarray, weight: np.ndarray, logit_weight: np.ndarray) -> np.ndarray:
    """circuit-tracer's edge scores on the graph made of the given edges (rows = targets).

    With |A| row-normalised over these edges, node influence I = w (A + A^2 + ...) for the logit weights w
    (the logit nodes' probabilities), edge score(t, s) = |A|[t, s] * (I[t] + w[t]).  target, source, weight
    [E] (node indices), logit_weight [N]  ->  [E].
    """
    n = len(logit_weight)
    absolute = np.abs(np.asarray(weight, dtype=np.float64))
    row_sum = np.bincount(target, absolute, minlength=n)
    normalized = absolute / np.maximum(row_sum[target], 1e-30)
    influence = np.zeros(n)
    current = np.asarray(logit_weight, dtype=np.float64)
    for _ in range(n + 1):
        current = np.bincount(source, current[target] * normalized, minlength=n)
        if not current.any():
            return normalized * (influence + logit_weight)[target]
        influence += current
    raise CompareError("edge influence did not converge: the stored edges form a cycle; the store is corrupted")


def pruned_edge_influence(nodes: pd.DataFrame, edges: pd.DataFrame) -> np.ndarray:
    """Edge scores (`edge_influence`) of the kept edges of a stored graph, in the order of `edges[kept]`."""
    kept = edges[edges["kept"]]
    logit_weight = np.zeros(int(nodes["node_index"].max()) + 1 if len(nodes) else 0)
    logits = nodes[nodes["kind"] == "logit"]
    logit_weight[logits["node_index"].to_numpy()] = logits["token_prob"].to_numpy(dtype=np.float64)
    return edge_influence(kept["target"].to_numpy(), kept["source"].to_numpy(), kept["weight"].to_numpy(),
                          logit_weight)


def head_metrics(head_loadings: pd.DataFrame, min_share: float, cover: float) -> dict:
    """Heads carrying a graph's edges. The head-carried weight of head (layer, h) is the sum of |part| over
    the graph's edges (head >= 0 rows; the summed other heads (-2) and the skip (-1) are no head).
    n_heads_any: heads with any part; n_heads_carrying: heads with >= min_share of the total;
    n_heads_cover: fewest heads holding `cover` of it."""
    heads = head_loadings[head_loadings["head"] >= 0]
    mass = heads["weight"].abs().groupby([heads["layer"], heads["head"]]).sum().to_numpy(dtype=np.float64)
    total = mass.sum()
    return {"n_heads_any": int((mass > 0).sum()),
            "n_heads_carrying": int((mass >= min_share * total).sum()) if total > 0 else 0,
            "n_heads_cover": count_to_share(mass, cover)}


QK_KEYS = ["layer", "head", "query_pos", "key_pos"]


def qk_edge_shares(qk_pairs: pd.DataFrame, ks: list[int]) -> pd.DataFrame:
    """Per QK-attributed attention edge: its gate logit, offset, score = logit - offset (= pairs + pair_rest),
    and top{k}_share = (sum of its k pairs of largest |value|) / score. The offset is left out: no pair can
    explain it, and the dense model has none. One row per (layer, head, query_pos, key_pos), sorted."""
    columns = [*QK_KEYS, "gate_logit", "offset", "score", "n_pairs", "top_query", "top_key", "top_value",
               *[f"top{k}_share" for k in ks]]
    if qk_pairs.empty:
        return pd.DataFrame(columns=columns)
    edges = qk_pairs.groupby(QK_KEYS, sort=True)["gate_logit"].first().astype(np.float64).to_frame()
    offsets = qk_pairs[qk_pairs["kind"] == "offset"].groupby(QK_KEYS)["value"].sum()
    edges["offset"] = offsets.reindex(edges.index, fill_value=0.0).astype(np.float64)
    edges["score"] = edges["gate_logit"] - edges["offset"]
    pairs = qk_pairs[qk_pairs["kind"] == "pair"].copy()
    pairs["magnitude"] = pairs["value"].abs()
    pairs = pairs.sort_values([*QK_KEYS, "magnitude"], ascending=[True] * len(QK_KEYS) + [False], kind="stable")
    rank = pairs.groupby(QK_KEYS).cumcount()
    edges["n_pairs"] = pairs.groupby(QK_KEYS).size().reindex(edges.index, fill_value=0)
    top = pairs[rank == 0].set_index(QK_KEYS)
    edges["top_query"] = top["query_component"].reindex(edges.index)
    edges["top_key"] = top["key_component"].reindex(edges.index)
    edges["top_value"] = top["value"].astype(np.float64).reindex(edges.index)
    score = edges["score"].where(edges["score"] != 0)
    for k in ks:
        top_sum = pairs[rank < k].groupby(QK_KEYS)["value"].sum().astype(np.float64)
        edges[f"top{k}_share"] = top_sum.reindex(edges.index, fill_value=0.0) / score
    return edges.reset_index()[columns]


def pair_key(task: str, prompt_index: int, prompt: str) -> str:
    """What pairs a dense graph with its sparse one: the task and the prompt's index, or the prompt text."""
    return f"custom:{prompt}" if task == "custom" else f"{task}:{int(prompt_index)}"


def graph_metrics(info: Mapping, nodes: pd.DataFrame, edges: pd.DataFrame, head_loadings: pd.DataFrame,
                  qk_edges: pd.DataFrame, config: CompareConfig) -> dict:
    """The comparison metrics of one stored graph (info: its graphs row; qk_edges: `qk_edge_shares`)."""
    attention = json.loads(info["settings"]).get("attention", {}).get("enabled", True)
    scores = pruned_edge_influence(nodes, edges)
    row = {key: info[key] for key in ("graph_id", "variant", "task", "prompt_index", "prompt", "n_pos", "n_nodes",
                                      "n_edges", "n_nodes_kept", "n_edges_kept")}
    row["pair"] = pair_key(info["task"], info["prompt_index"], info["prompt"])
    row["n_features_kept"] = int(((nodes["kind"] == "feature") & nodes["kept"]).sum())
    for share in config.influence_shares:
        row[f"n_edges_influence_{share_name(share)}"] = count_to_share(scores, share)
    heads = head_metrics(head_loadings, config.head_min_share, config.head_cover)
    row.update({k: v if attention else np.nan for k, v in heads.items()})
    row["n_attention_edges"] = len(qk_edges) if attention else np.nan
    explained = qk_edges[qk_edges["query_pos"] > 0] if len(qk_edges) else qk_edges  # BOS query: one token, trivial
    for k in config.qk_top_k:
        shares = explained[f"top{k}_share"].dropna() if len(explained) else pd.Series(dtype=float)
        row[f"qk_top{k}_share"] = float(shares.median()) if len(shares) else np.nan
    for key in ("replacement_score", "completeness_score", "pruned_replacement_score", "pruned_completeness_score"):
        row[key] = float(info[key])
    return row


def metric_columns(config: CompareConfig) -> list[str]:
    """The per-graph metrics summarised per task, in report order."""
    return ["n_nodes_kept", "n_edges_kept", "n_features_kept",
            *[f"n_edges_influence_{share_name(s)}" for s in config.influence_shares],
            "n_heads_any", "n_heads_carrying", "n_heads_cover", "n_attention_edges",
            *[f"qk_top{k}_share" for k in config.qk_top_k],
            "replacement_score", "completeness_score", "pruned_replacement_score", "pruned_completeness_score"]


def store_metrics(store, config: CompareConfig, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(graph_metrics: one row per graph, qk_edges: one row per attention edge with its graph_id)."""
    from tqdm import tqdm

    graphs = store.list_graphs()
    if graphs.empty:
        raise CompareError(f"the store at {store.root} holds no graphs; run the attribution stage first")
    rows, qk_frames = [], []
    records = graphs.sort_values(["variant", "task", "prompt_index", "prompt"]).to_dict("records")
    for info in tqdm(records, desc="compare graphs", disable=not progress):
        stored = store.load_graph(info["graph_id"])
        qk = qk_edge_shares(stored.qk_pairs, config.qk_top_k)
        rows.append(graph_metrics(info, stored.nodes, stored.edges, stored.head_loadings, qk, config))
        qk.insert(0, "graph_id", info["graph_id"])
        qk.insert(1, "variant", info["variant"])
        qk_frames.append(qk)
    qk_edges = pd.concat(qk_frames, ignore_index=True) if qk_frames else pd.DataFrame()
    return pd.DataFrame(rows), qk_edges


# --------------------------------------------------------------------------------------------------
# Summaries over prompts


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
    from attribution.tasks import invalid_reason, load_task

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
    from attribution import component_circuits
    from attribution.tasks import TaskError

    circuit = config.circuit
    prepared = {variant: component_circuits.prepare(model, circuit.split_qkv, circuit.gate_gradient)
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
                by_variant[variant] = component_circuits.run_prepared(circuit, prepared[variant], tokenizer, prompts)
                if config.per_prompt:
                    rows += prompt_circuit_rows(task, variant, indices, component_circuits.run_prepared_per_prompt(
                        circuit, prepared[variant], tokenizer, prompts))
            results[task] = by_variant
            prompt_rows += rows
        except (component_circuits.CircuitError, TaskError) as error:
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


# --------------------------------------------------------------------------------------------------
# Inputs for the report that need a model: sparsity and one prompt's attention


def sparsity_table(metrics: Mapping) -> pd.DataFrame:
    """Open-edge fraction per (context_length, layer, head) from the sparsify stage's metrics.json, with the
    overall fraction at that context length (open gates / causal pairs over every layer and head)."""
    rows = []
    for section in (metrics.get("edges"), metrics.get("long_context")):
        if not section:
            continue
        for layer, heads in enumerate(section["edge_fraction_per_head"]):
            rows += [(int(section["context_length"]), layer, head, float(f), float(section["edge_fraction"]))
                     for head, f in enumerate(heads)]
    if not rows:
        raise CompareError("the sparsify metrics hold no edge_fraction_per_head; rerun the sparsify stage")
    return pd.DataFrame(rows, columns=["context_length", "layer", "head", "edge_fraction", "overall_edge_fraction"])


def attention_pattern(gated, tokenizer, prompt: str) -> pd.DataFrame:
    """Attention weights applied to values for `prompt` with gates off (dense) and on (sparse): one row per
    (layer, head, query, key), key <= query."""
    import torch

    from attribution.replacement import tokenize_prompt

    tokens = torch.as_tensor(tokenize_prompt(tokenizer, prompt))[None].to(gated.offsets.device)
    mode = gated.mode
    weights = {}
    with torch.no_grad():
        for variant, gate_mode in (("dense", "dense"), ("sparse", "eval")):
            gated.set_mode(gate_mode)
            weights[variant] = torch.stack([a[0].float().cpu() for a in gated(tokens, output_attentions=True).attentions])
    gated.set_mode(mode)
    n_layers, n_heads, n_pos, _ = weights["dense"].shape
    layer, head, query, key = np.meshgrid(np.arange(n_layers), np.arange(n_heads), np.arange(n_pos), np.arange(n_pos),
                                          indexing="ij")
    causal = (key <= query).ravel()
    frame = pd.DataFrame({"layer": layer.ravel(), "head": head.ravel(), "query": query.ravel(), "key": key.ravel(),
                          "dense": weights["dense"].numpy().ravel(), "sparse": weights["sparse"].numpy().ravel()})
    frame = frame[causal].reset_index(drop=True)
    strings = np.array([tokenizer.decode([t]) for t in tokens[0].tolist()], dtype=object)
    frame["query_token"], frame["key_token"] = strings[frame["query"]], strings[frame["key"]]
    return frame


# --------------------------------------------------------------------------------------------------
# Examples: one prompt per task, its graphs and their strongest attention edge


def strongest_attention_edge(head_loadings: pd.DataFrame) -> pd.Series | None:
    """The head part (head >= 0) of largest |weight| over a graph's edges, with its (query, key); parts
    whose (query, key) crosses positions first, since those are what attention adds."""
    heads = head_loadings[(head_loadings["head"] >= 0) & (head_loadings["query_pos"] >= 0)]
    if heads.empty:
        return None
    crossing = heads[heads["query_pos"] != heads["key_pos"]]
    heads = crossing if len(crossing) else heads
    return heads.loc[heads["weight"].abs().idxmax()]


def example_tables(store, metrics: pd.DataFrame, top_pairs: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per task, the first prompt attributed on every variant: its graph ids, and per graph the strongest
    attention edge and its top QK pairs by |value| (with the score they explain)."""
    examples, pair_rows = [], []
    for task, part in metrics.groupby("task", sort=True):
        variants = sorted(part["variant"].unique())
        both = part.groupby("pair")["variant"].nunique()
        pair = sorted(both[both == len(variants)].index, key=lambda p: part.loc[part["pair"] == p, "prompt_index"].min())
        if not pair:
            continue
        for row in part[part["pair"] == pair[0]].itertuples(index=False):
            stored = store.load_graph(row.graph_id)
            edge = strongest_attention_edge(stored.head_loadings)
            example = {"task": task, "variant": row.variant, "graph_id": row.graph_id, "pair": row.pair,
                       "prompt": row.prompt, "edge_target": None, "edge_source": None, "edge_weight": None,
                       "edge_n_heads": None, "layer": None, "head": None,
                       "query_pos": None, "key_pos": None, "head_part": None, "gate_logit": None, "score": None}
            if edge is not None:
                loadings = stored.head_loadings
                on_edge = loadings[(loadings["target"] == edge["target"]) & (loadings["source"] == edge["source"])]
                edges = stored.edges
                weight = edges.loc[(edges["target"] == edge["target"]) & (edges["source"] == edge["source"]), "weight"]
                example.update(edge_target=int(edge["target"]), edge_source=int(edge["source"]),
                               edge_weight=float(weight.iloc[0]), edge_n_heads=int((on_edge["head"] >= 0).sum()),
                               layer=int(edge["layer"]), head=int(edge["head"]), query_pos=int(edge["query_pos"]),
                               key_pos=int(edge["key_pos"]), head_part=float(edge["weight"]))
                pairs = stored.qk_pairs
                chosen = pairs[(pairs["layer"] == example["layer"]) & (pairs["head"] == example["head"])
                               & (pairs["query_pos"] == example["query_pos"]) & (pairs["key_pos"] == example["key_pos"])]
                if len(chosen):
                    offset = float(chosen.loc[chosen["kind"] == "offset", "value"].sum())
                    example["gate_logit"] = float(chosen["gate_logit"].iloc[0])
                    example["score"] = example["gate_logit"] - offset
                    top = chosen[chosen["kind"] == "pair"]
                    top = top.loc[top["value"].abs().sort_values(ascending=False, kind="stable").index[:top_pairs]]
                    pair_rows += [{"task": task, "variant": row.variant, "graph_id": row.graph_id, "rank": rank,
                                   "query_component": p.query_component, "key_component": p.key_component,
                                   "value": float(p.value), "share_of_score": float(p.value) / example["score"]
                                   if example["score"] else np.nan}
                                  for rank, p in enumerate(top.itertuples(index=False))]
            examples.append(example)
    pair_columns = ["task", "variant", "graph_id", "rank", "query_component", "key_component", "value", "share_of_score"]
    return pd.DataFrame(examples), pd.DataFrame(pair_rows, columns=pair_columns)


# --------------------------------------------------------------------------------------------------
# Entry point


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
    metrics.json (the sparsity figure). Without them those parts are left out and the summary says so.
    labels: optional feature labels per variant, {variant: {(layer, feature): text}}, for the report. Returns a summary dict.
    """
    import yaml

    from attribution.store import open_store

    config = config or CompareConfig()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
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
        from transcoders.stage import load_source

        gated, tokenizer, _ = load_source(Path(sparse_model))
        written["attention_pattern"] = attention_pattern(gated, tokenizer, examples["prompt"].iloc[0]
                                                         if len(examples) else metrics["prompt"].iloc[0])
    else:
        left_out.append("attention pattern (no sparse model given)")
    circuit_tasks = config.circuits.tasks or sorted(t for t in metrics["task"].unique() if t != "custom")
    if config.circuits.enabled and circuit_tasks and dense_model is not None and sparse_model is not None:
        from transcoders.stage import load_source

        models = {variant: load_source(source)[:2] for variant, source in (("dense", dense_model),
                                                                            ("sparse", Path(sparse_model)))}
        curves, circuit_summary, prompt_circuits = run_circuits(config.circuits, models, circuit_tasks,
                                                                config.bootstrap_samples, config.confidence, config.seed)
        written["circuit_curves"], written["circuit_summary"] = curves, circuit_summary
        if prompt_circuits is not None:
            written["circuit_prompts"] = prompt_circuits
    elif config.circuits.enabled:
        left_out.append("component circuits (need dense_model, sparse_model and a task other than custom)")
    for name, frame in written.items():
        write_table(frame, output_dir, name)
    report = None
    if config.report:
        from attribution.report import write_report

        report = str(write_report(output_dir, store_uri=store_uri, labels=labels))
    ratios = summary_table[(summary_table["variant"] == RATIO) & (summary_table["task"] != "all")]
    return {
        "graphs": len(metrics), "tasks": sorted(metrics["task"].unique()), "tables": sorted(OUTPUT_FILES[n] for n in written),
        "left_out": left_out, "report": report,
        "edges_kept_ratio": {r.task: None if np.isnan(r.mean) else r.mean
                             for r in ratios[ratios["metric"] == "n_edges_kept"].itertuples()},
    }
