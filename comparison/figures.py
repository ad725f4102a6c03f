"""The comparison report's figures: matplotlib plots drawn from the comparison tables and stored graphs,
each saved as a PNG in `report_files/` and returned as its path relative to the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from attribution.frontend import to_networkx
from circuits.config import CURVE_KINDS
from comparison.config import RATIO
from comparison.formatting import Labels, component_label, feature_name, fmt, metric_title

FIGURE_DIR = "report_files"
VARIANT_COLORS = {"dense": "#4c72b0", "sparse": "#dd8452"}


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
    """Explained effect vs heads kept and vs edges carrying signal, dense and sparse, one row per task and gate
    mode; vertical lines at the counts reaching the target: first crossing dotted, stays-above dashed."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plt = _plt()
    target = float(circuits["target"].iloc[0])
    reached = circuits.set_index(["task", "gates", "kind"])
    rows = sorted({(task, gates) for task, gates in zip(curves["task"], curves["gates"])})
    kinds = [kind for kind in CURVE_KINDS if kind in set(curves["kind"])]
    fig, axes = plt.subplots(len(rows), len(kinds), figsize=(4.5 * len(kinds), 3.2 * len(rows)), squeeze=False)
    for row, (task, gates) in enumerate(rows):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            selected = curves[(curves["task"] == task) & (curves["gates"] == gates) & (curves["kind"] == kind)]
            for variant, part in selected.groupby("variant"):
                part = part.sort_values("count")
                color = VARIANT_COLORS.get(variant)
                ax.plot(part["carrying"].clip(lower=0.8), part["explained_effect"], marker="o", ms=3, label=variant,
                        color=color)
                for reading, style in (("count", ":"), ("stays_above", "--")):
                    key = (task, gates, kind)
                    count = reached.loc[key, f"{variant}_{reading}"] if key in reached.index else None
                    if count is not None and not pd.isna(count):
                        ax.axvline(max(float(count), 0.8), color=color, lw=0.8, ls=style)
            ax.axhline(target, color="k", lw=0.6, ls="--")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"{kind.replace('_', ' ')} kept" + ("" if kind == "heads" else " (carrying signal)"))
            ax.set_ylabel("explained effect")
            ax.set_title(f"{task}, gates {gates}: {kind}", fontsize=9)
            ax.legend(fontsize=8)
    return _save(fig, path)


def plot_prompt_circuits(prompts: pd.DataFrame, circuits: pd.DataFrame, path: Path) -> str:
    """Per-prompt circuit sizes: one point per prompt at (dense count, sparse count), per task (rows) and kind
    (columns), on log axes; the diagonal is "same size", the dashed line the paper's smallest ratio. The
    headline gate mode only."""
    plt = _plt()
    headline = circuits.loc[circuits["headline"], "gates"].iloc[0]
    circuits = circuits[circuits["gates"] == headline]
    prompts = prompts[prompts["gates"] == headline]
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
