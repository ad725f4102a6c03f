"""The comparison report: one HTML file with PNGs in `report_files/` beside it, drawn from the comparison
tables and the settings saved beside them (`comparison.stage.compare_store`) and, for the example graphs,
the graph store. Every number shown is a value of one of those Parquet tables, formatted by `fmt`.

Feature ids are shown as `L{layer}:F{feature}`; pass `labels={variant: {(layer, feature): text}}` (each
variant's CLT has its own features, e.g. `open_features(clt_dir).labels()`) to show a label beside each.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from attribution.frontend import to_networkx
from attribution.store import open_store
from circuits.config import CURVE_KINDS
from comparison.config import OUTPUT_FILES, RATIO, CompareConfig, load_compare_config
from comparison.graph_metrics import metric_columns, share_name

REPORT_FILE = "report.html"
FIGURE_DIR = "report_files"
VARIANT_COLORS = {"dense": "#4c72b0", "sparse": "#dd8452"}
Labels = Mapping[tuple[int, int], str]

METRIC_TITLES = {
    "n_nodes_kept": "nodes kept", "n_edges_kept": "edges kept", "n_features_kept": "feature nodes kept",
    "n_heads_any": "heads with any part", "n_heads_carrying": "heads carrying (share >= min)",
    "n_attention_edges": "QK-attributed attention edges",
    "replacement_score": "replacement score", "completeness_score": "completeness score",
    "pruned_replacement_score": "pruned replacement score", "pruned_completeness_score": "pruned completeness score",
}


def metric_title(metric: str, head_cover: float = CompareConfig.model_fields["head_cover"].default) -> str:
    """A metric's name as the report shows it; `head_cover`: the share `n_heads_cover` counts heads for."""
    if metric == "n_heads_cover":
        return f"heads for {share_name(head_cover)}% of head-carried weight"
    if metric.startswith("n_edges_influence_"):
        return f"edges for {metric.rsplit('_', 1)[1]}% of edge influence"
    if metric.startswith("qk_top"):
        return f"share of score by top {metric[6:].split('_')[0]} QK pairs (median)"
    return METRIC_TITLES.get(metric, metric)


def fmt(value) -> str:
    """How the report writes a number: '-' for missing, integers plainly, else 3 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    value = float(value)
    if value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def fmt_ci(mean, low, high) -> str:
    return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


_FEATURE = re.compile(r"^(\d+)_(-?\d+)_(\d+)$")


def component_label(component: str, labels: Labels | None = None, token_strings: list[str] | None = None) -> str:
    """A readable name for a QK component or node id: features `L{layer}:F{feature}@{pos}` (+ label),
    errors `err L{layer}@{pos}`, token embeddings `"tok"@{pos}`, head outputs `L{layer}H{head}@{pos}`."""
    if component.startswith("E_"):
        _, _, pos = component.split("_")
        text = repr(token_strings[int(pos)]) if token_strings and int(pos) < len(token_strings) else "tok"
        return f"{text}@{pos}"
    if component.startswith("attn_"):
        _, layer, head, pos = component.split("_")
        return f"L{layer}H{head}@{pos}"
    if component.startswith("bias_"):
        return f"bias@{component.split('_')[1]}"
    match = _FEATURE.match(component)
    if match:
        layer, feature, pos = (int(g) for g in match.groups())
        if feature < 0:
            return f"err L{layer}@{pos}"
        return f"{feature_name(layer, feature, labels)}@{pos}"
    return component


def feature_name(layer: int, feature: int, labels: Labels | None = None) -> str:
    name = f"L{layer}:F{feature}"
    label = (labels or {}).get((layer, feature))
    return f"{name} {label}" if label else name


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return f"{FIGURE_DIR}/{path.name}"


# --------------------------------------------------------------------------------------------------
# Figures


def plot_sparsity(sparsity: pd.DataFrame, path: Path) -> str:
    """Open-edge fraction per layer x head, one panel per context length."""
    plt = _plt()
    contexts = sorted(sparsity["context_length"].unique())
    fig, axes = plt.subplots(1, len(contexts), figsize=(4.5 * len(contexts), 4), squeeze=False)
    for ax, context in zip(axes[0], contexts):
        part = sparsity[sparsity["context_length"] == context]
        grid = part.pivot(index="layer", columns="head", values="edge_fraction").to_numpy()
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(grid.max())))
        overall = part["overall_edge_fraction"].iloc[0]
        ax.set_title(f"open edges at {context} tokens: {fmt(overall)}")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(0, grid.shape[0], max(1, grid.shape[0] // 15)))
        fig.colorbar(image, ax=ax, label="open fraction")
    return _save(fig, path)


def plot_attention(pattern: pd.DataFrame, path: Path, n_heads: int = 4) -> str:
    """Dense vs sparse attention on the heads whose patterns the gates changed most."""
    plt = _plt()
    changed = (pattern["dense"] - pattern["sparse"]).abs().groupby([pattern["layer"], pattern["head"]]).sum()
    chosen = changed.sort_values(ascending=False, kind="stable").index[:n_heads]
    n_pos = int(pattern["query"].max()) + 1
    tokens = pattern[pattern["key"] == 0].drop_duplicates("query").sort_values("query")["query_token"].tolist()
    fig, axes = plt.subplots(2, len(chosen), figsize=(3.4 * len(chosen), 7), squeeze=False)
    for col, (layer, head) in enumerate(chosen):
        rows = pattern[(pattern["layer"] == layer) & (pattern["head"] == head)]
        for row, variant in enumerate(("dense", "sparse")):
            grid = np.zeros((n_pos, n_pos))
            grid[rows["query"], rows["key"]] = rows[variant]
            ax = axes[row][col]
            ax.imshow(grid, cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"{variant} L{layer} H{head}", fontsize=9)
            if n_pos <= 40:
                ax.set_xticks(range(n_pos), tokens, rotation=90, fontsize=6)
                ax.set_yticks(range(n_pos), tokens, fontsize=6)
    return _save(fig, path)


def plot_task_metrics(summary: pd.DataFrame, metrics: list[str], path: Path, head_cover: float) -> str:
    """Per task, each variant's mean with its bootstrap CI, one panel per metric."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.6), squeeze=False)
    tasks = [t for t in summary["task"].unique() if t != "all"]
    for ax, metric in zip(axes[0], metrics):
        for offset, variant in ((-0.2, "dense"), (0.2, "sparse")):
            rows = summary[(summary["metric"] == metric) & (summary["variant"] == variant)].set_index("task")
            rows = rows.reindex(tasks)
            means = rows["mean"].to_numpy(dtype=float)
            errors = np.abs(np.stack([means - rows["ci_low"].to_numpy(dtype=float),
                                      rows["ci_high"].to_numpy(dtype=float) - means]))
            ax.bar(np.arange(len(tasks)) + offset, means, 0.4, yerr=errors, capsize=3, label=variant,
                   color=VARIANT_COLORS[variant])
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, fontsize=8)
        ax.set_title(metric_title(metric, head_cover), fontsize=9)
        means = summary.loc[(summary["metric"] == metric) & (summary["variant"] != RATIO), "mean"].dropna()
        if len(means) and means.min() > 0 and means.max() / means.min() > 20:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_circuit_curves(curves: pd.DataFrame, circuits: pd.DataFrame, path: Path) -> str:
    """Explained effect vs heads kept and vs edges kept, dense and sparse, one row per task; dotted lines
    at the counts reaching the target."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt = _plt()
    target = float(circuits["target"].iloc[0])
    reached = circuits.set_index(["task", "kind"])
    tasks = sorted(curves["task"].unique())
    kinds = [kind for kind in CURVE_KINDS if kind in set(curves["kind"])]
    fig, axes = plt.subplots(len(tasks), len(kinds), figsize=(4.5 * len(kinds), 3.2 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            for variant, part in curves[(curves["task"] == task) & (curves["kind"] == kind)].groupby("variant"):
                part = part.sort_values("count")
                ax.plot(part["count"].clip(lower=0.8), part["explained_effect"], marker="o", ms=3, label=variant,
                        color=VARIANT_COLORS.get(variant))
                count = reached.loc[(task, kind), f"{variant}_count"] if (task, kind) in reached.index else None
                if count is not None and not pd.isna(count):
                    ax.axvline(max(float(count), 0.8), color=VARIANT_COLORS.get(variant), lw=0.8, ls=":")
            ax.axhline(target, color="k", lw=0.6, ls="--")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"{kind.replace('_', ' ')} kept")
            ax.set_ylabel("explained effect")
            ax.set_title(f"{task}: {kind}", fontsize=9)
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_prompt_circuits(prompts: pd.DataFrame, circuits: pd.DataFrame, path: Path) -> str:
    """Per-prompt circuit sizes: one point per prompt at (dense count, sparse count), per task (rows) and kind
    (columns), on log axes; the diagonal is "same size", the dashed line the paper's smallest ratio."""
    plt = _plt()
    reached = prompts[prompts["count_at_target"].notna()]
    paired = reached.pivot_table(index=["task", "kind", "prompt_index"], columns="variant", values="count_at_target",
                                 aggfunc="first").reindex(columns=["dense", "sparse"]).dropna().astype(float)
    tasks = sorted(prompts["task"].unique())
    kinds = [kind for kind in CURVE_KINDS if kind in set(prompts["kind"].dropna())]
    paper = circuits.drop_duplicates("kind").set_index("kind")["paper_ratio_min"]
    summary = circuits.set_index(["task", "kind"])
    fig, axes = plt.subplots(len(tasks), len(kinds), figsize=(3.6 * len(kinds), 3.4 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            part = paired.loc[(task, kind)] if (task, kind) in paired.index.droplevel(2) else paired.iloc[:0]
            low = max(min([*part["dense"], *part["sparse"], 1.0]) / 2, 0.5)
            high = max([*part["dense"], *part["sparse"], 2.0]) * 2
            ax.plot([low, high], [low, high], color="k", lw=0.6, label="same size")
            if kind in paper.index:
                ratio = float(paper[kind])
                ax.plot([low, high], [low / ratio, high / ratio], color="k", lw=0.6, ls="--",
                        label=f"{fmt(ratio)}x fewer")
            ax.scatter(part["dense"].clip(lower=low), part["sparse"].clip(lower=low), s=14,
                       color=VARIANT_COLORS.get("sparse"))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(low, high)
            ax.set_ylim(low, high)
            ax.set_xlabel(f"dense {kind.replace('_', ' ')}")
            ax.set_ylabel(f"sparse {kind.replace('_', ' ')}")
            ratio = summary.loc[(task, kind), "prompt_ratio"] if (task, kind) in summary.index else None
            ax.set_title(f"{task}: {len(part)} prompts, dense/sparse {fmt(ratio)}", fontsize=9)
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_graph(stored, path: Path, labels: Labels | None = None, max_edges: int = 150) -> str:
    """The pruned graph: nodes at (position, layer), the strongest kept edges (blue +, red -)."""
    plt = _plt()
    graph = to_networkx(stored)
    tokens = list(stored.info["token_strings"])
    n_layers = int(stored.info["n_layers"])
    slots: dict[tuple[int, int], int] = {}
    xy = {}
    for node, data in sorted(graph.nodes(data=True), key=lambda item: (item[1]["layer"], item[1]["pos"], item[0])):
        key = (data["layer"], data["pos"])
        slot = slots.get(key, 0)
        slots[key] = slot + 1
        xy[node] = (data["pos"] + 0.12 * slot, data["layer"])
    fig, ax = plt.subplots(figsize=(min(14, 3 + 0.35 * len(tokens)), 5))
    edges = sorted(graph.edges(data="weight"), key=lambda e: -abs(e[2]))[:max_edges]
    largest = max((abs(w) for *_, w in edges), default=1.0) or 1.0
    for source, target, weight in edges:
        (x0, y0), (x1, y1) = xy[source], xy[target]
        ax.plot([x0, x1], [y0, y1], color="#2a6fdb" if weight > 0 else "#d62728", lw=0.3 + 2 * abs(weight) / largest,
                alpha=0.25 + 0.6 * abs(weight) / largest, zorder=1)
    styles = {"feature": ("o", "#555555"), "error": ("s", "#bbbbbb"), "token": ("s", "#2ca02c"), "logit": ("D", "#ff7f0e")}
    for kind, (marker, color) in styles.items():
        nodes = [n for n, d in graph.nodes(data=True) if d["kind"] == kind]
        if nodes:
            ax.scatter([xy[n][0] for n in nodes], [xy[n][1] for n in nodes], marker=marker, c=color, s=30, zorder=2,
                       label=kind)
    features = [(n, d) for n, d in graph.nodes(data=True) if d["kind"] == "feature"]
    if len(features) <= 40:
        for node, data in features:
            ax.annotate(feature_name(data["layer"], data["feature"], labels), xy[node], fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(-1, n_layers + 2), ["emb", *[f"L{i}" for i in range(n_layers)], "", "logit"], fontsize=7)
    ax.set_title(f"{stored.info['variant']}: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges "
                 f"(strongest {len(edges)} drawn)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_qk_pairs(pairs: pd.DataFrame, title: str, path: Path, labels: Labels | None, tokens: list[str]) -> str:
    """The top (query component, key component) pairs of one attention edge, as shares of its score."""
    plt = _plt()
    names = [f"{component_label(q, labels, tokens)} x {component_label(k, labels, tokens)}"
             for q, k in zip(pairs["query_component"], pairs["key_component"])]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(pairs) + 1.2))
    ax.barh(range(len(pairs)), pairs["share_of_score"], color="#4c72b0")
    ax.set_yticks(range(len(pairs)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("share of the edge's score")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# HTML


def table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def task_table_rows(summary: pd.DataFrame, metrics: list[str], head_cover: float) -> list[list[str]]:
    """Per task and metric: dense, sparse and dense/sparse as `mean [low, high]`, and the number of pairs."""
    rows = []
    indexed = summary.set_index(["task", "metric", "variant"])
    for task in summary["task"].unique():
        for metric in metrics:
            cells = [task, metric_title(metric, head_cover)]
            for variant in ("dense", "sparse", RATIO):
                key = (task, metric, variant)
                cells.append(fmt_ci(*indexed.loc[key, ["mean", "ci_low", "ci_high"]]) if key in indexed.index else "-")
            pairs = (task, metric, RATIO)
            cells.append(fmt(indexed.loc[pairs, "n"]) if pairs in indexed.index else "-")
            rows.append(cells)
    return rows


def circuit_table_rows(circuits: pd.DataFrame) -> list[list[str]]:
    """Per task and kind: pooled counts and ratios, then (with per-prompt circuits) the ratio of mean per-prompt
    counts with its CI and the number of prompt pairs, the paper's range and the status."""
    per_prompt = "prompt_ratio" in circuits.columns
    return [[r.task, r.kind, fmt(r.dense_count), fmt(r.sparse_count), fmt(r.ratio), fmt(r.ratio_stays_above),
             fmt_ci(r.prompt_ratio, r.prompt_ratio_ci_low, r.prompt_ratio_ci_high) if per_prompt else "-",
             fmt(r.prompt_pairs) if per_prompt else "-",
             f"{fmt(r.paper_ratio_min)}-{fmt(r.paper_ratio_max)}", r.status]
            for r in circuits.itertuples(index=False)]


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td:nth-child(2){text-align:left}img{max-width:100%}h2{margin-top:2em}
.note{color:#555;font-size:13px}"""


def _read(output_dir: Path, name: str) -> pd.DataFrame | None:
    path = output_dir / OUTPUT_FILES[name]
    return pd.read_parquet(path) if path.exists() else None


def write_report(output_dir: str | Path, store_uri: str | Path | None = None,
                 labels: Mapping[str, Labels] | None = None) -> Path:
    """Render report.html (and report_files/*.png) from the comparison tables in `output_dir` and the settings
    saved beside them; the example graphs are drawn from the store at `store_uri` when given. Returns the HTML
    path."""
    output_dir = Path(output_dir)
    metrics, summary = _read(output_dir, "graph_metrics"), _read(output_dir, "task_summary")
    if metrics is None or summary is None:
        raise FileNotFoundError(f"{output_dir} holds no comparison tables; run compare_store first")
    config = load_compare_config(output_dir)
    figures = output_dir / FIGURE_DIR
    figures.mkdir(exist_ok=True)
    shown = [m for m in metric_columns(config) if m in set(summary["metric"])]
    confidence = f"{fmt(100 * config.confidence)}%"
    counts = metrics.groupby(["task", "variant"]).size().unstack(fill_value=0)
    parts = [f"<h1>Dense vs sparse circuits</h1><p>{len(metrics)} graphs; per task and variant:</p>",
             table_html(["task", *counts.columns], [[t, *map(fmt, r)] for t, r in counts.iterrows()])]

    sparsity = _read(output_dir, "sparsity")
    if sparsity is not None:
        parts += ["<h2>Attention sparsity</h2>", f'<img src="{plot_sparsity(sparsity, figures / "sparsity.png")}">',
                  table_html(["context", "open-edge fraction"], [[fmt(c), fmt(f)] for c, f in sparsity.groupby(
                      "context_length")["overall_edge_fraction"].first().items()])]
    pattern = _read(output_dir, "attention_pattern")
    if pattern is not None:
        prompt = "".join(pattern[pattern["key"] == 0].drop_duplicates("query").sort_values("query")["query_token"])
        parts += [f"<h2>Attention on one prompt</h2><p class=note>{html.escape(prompt)!s}: the heads whose "
                  "pattern the gates change most, dense (top) and sparse (bottom)</p>",
                  f'<img src="{plot_attention(pattern, figures / "attention.png")}">']

    largest_share = f"n_edges_influence_{share_name(max(config.influence_shares))}"
    size_metrics = [m for m in ("n_edges_kept", "n_features_kept", largest_share, "n_heads_cover") if m in shown]
    parts += [f"<h2>Feature-level circuits</h2><p class=note>Mean over prompts with {confidence} bootstrap CI; the "
              "ratio is mean(dense) / mean(sparse) over prompts attributed on both (pairs resampled together).</p>",
              f'<img src="{plot_task_metrics(summary, size_metrics, figures / "graph_sizes.png", config.head_cover)}">',
              table_html(["task", "metric", "dense", "sparse", "dense/sparse", "pairs"],
                         task_table_rows(summary, shown, config.head_cover))]

    curves, circuits = _read(output_dir, "circuit_curves"), _read(output_dir, "circuit_summary")
    if circuits is not None:
        target = float(circuits["target"].iloc[0])
        parts.append(f"<h2>Component circuits</h2><p class=note>Explained effect (activation patching) against "
                     f"the number of heads / edges kept, ranked by attribution patching; counts reaching {fmt(target)}"
                     ". Edges join components summed over positions; position_edges are the same edges at one "
                     "token position (counted from the last token). dense, sparse and dense/sparse: one circuit "
                     "over all the task's prompts; per prompt: one circuit per prompt, mean(dense) / mean(sparse) "
                     f"over the prompts both reach the target with, with a {confidence} bootstrap CI over prompt pairs. "
                     f"Paper's ratios: a range over {html.escape(circuits['paper_tasks'].iloc[0])}.</p>")
        if curves is not None and len(curves):
            parts.append(f'<img src="{plot_circuit_curves(curves, circuits, figures / "circuit_curves.png")}">')
        prompts = _read(output_dir, "circuit_prompts")
        if prompts is not None and prompts["count_at_target"].notna().any():
            parts.append("<p class=note>One circuit per prompt: its size on the dense (x) and the sparse (y) model, "
                         "at the same explained effect; below the diagonal the sparse circuit is smaller.</p>"
                         f'<img src="{plot_prompt_circuits(prompts, circuits, figures / "prompt_circuits.png")}">')
        parts.append(table_html(["task", "kind", "dense", "sparse", "dense/sparse", "dense/sparse (stays above)",
                                 "per prompt dense/sparse [CI]", "prompt pairs", "paper", "status"],
                                circuit_table_rows(circuits)))

    examples, pairs = _read(output_dir, "examples"), _read(output_dir, "example_qk_pairs")
    if examples is not None and len(examples):
        parts.append("<h2>One prompt per task</h2>")
        store = None
        if store_uri is not None:
            store = open_store(store_uri)
        for task, group in examples.groupby("task", sort=True):
            parts.append(f"<h3>{html.escape(task)}: {html.escape(group['prompt'].iloc[0])!s}</h3>")
            for example in group.itertuples(index=False):
                variant_labels = (labels or {}).get(example.variant)
                stored = store.load_graph(example.graph_id) if store is not None else None
                tokens = list(stored.info["token_strings"]) if stored is not None else None
                if stored is not None:
                    parts.append(f'<img src="{plot_graph(stored, figures / f"graph_{task}_{example.variant}.png", variant_labels)}">')
                parts.append(_example_edge_html(example, pairs, figures, variant_labels, tokens))
    (output_dir / REPORT_FILE).write_text(f"<!doctype html><html><head><meta charset=utf-8><title>Dense vs sparse "
                                          f"circuits</title><style>{STYLE}</style></head><body>{''.join(parts)}"
                                          "</body></html>")
    return output_dir / REPORT_FILE


def _example_edge_html(example, pairs: pd.DataFrame | None, figures: Path, labels: Labels | None,
                       tokens: list[str] | None) -> str:
    """The strongest attention edge of one example graph and its top QK pairs (figure and table)."""
    if example.layer is None or pd.isna(example.layer):
        return f"<p class=note>{example.variant}: no edge of this graph is carried by an attention head.</p>"
    where = (f"{example.variant}: strongest attention edge L{int(example.layer)} H{int(example.head)}, query "
             f"{int(example.query_pos)} -> key {int(example.key_pos)}; head part {fmt(example.head_part)} of graph edge "
             f"{fmt(example.edge_weight)} (carried by {fmt(example.edge_n_heads)} heads), gate logit "
             f"{fmt(example.gate_logit)}, score {fmt(example.score)}")
    rows = pairs[(pairs["graph_id"] == example.graph_id)] if pairs is not None else pd.DataFrame()
    if rows.empty:
        return f"<p class=note>{html.escape(where)}; no QK attribution stored for it.</p>"
    image = plot_qk_pairs(rows, where.replace("; ", "\n", 1), figures / f"qk_{example.task}_{example.variant}.png", labels, tokens)
    table = table_html(["query component", "key component", "value", "share of score"],
                       [[component_label(r.query_component, labels, tokens), component_label(r.key_component, labels,
                                                                                               tokens),
                         fmt(r.value), fmt(r.share_of_score)] for r in rows.itertuples(index=False)])
    return f"<p>{html.escape(where)}</p><img src=\"{image}\">{table}"
