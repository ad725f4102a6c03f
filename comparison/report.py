"""The comparison report: one HTML file with PNGs in `report_files/` beside it (`comparison.figures`), drawn
from the comparison tables and the settings saved beside them (`comparison.stage.compare_store`) and, for the
example graphs, the graph store. Every number shown is a value of one of those Parquet tables, formatted by
`comparison.formatting.fmt`.

Feature ids are shown as `L{layer}:F{feature}`; pass `labels={variant: {(layer, feature): text}}` (each
variant's CLT has its own features, e.g. `open_features(clt_dir).labels()`) to show a label beside each.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from attribution.store import open_store
from comparison.config import OUTPUT_FILES, RATIO, load_compare_config
from comparison.figures import (
    FIGURE_DIR,
    plot_attention,
    plot_circuit_curves,
    plot_graph,
    plot_prompt_circuits,
    plot_qk_pairs,
    plot_sparsity,
    plot_task_metrics,
)
from comparison.formatting import Labels, component_label, fmt, fmt_ci, metric_title
from comparison.graph_metrics import metric_columns, share_name

REPORT_FILE = "report.html"


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
    """Per task, gate mode (the headline marked *) and kind: pooled counts and ratios with their bootstrap CIs
    (first crossing, stays above), then (with per-prompt circuits) the ratio of mean per-prompt counts with its
    CI, the prompt pairs and the prompts dropped for a small gap, the behaviour gate, the ranking's Spearman
    correlation with exact patching, the paper's range and the status."""
    per_prompt = "prompt_ratio" in circuits.columns
    return [[r.task, f"{r.gates}{' *' if r.headline else ''}", r.kind, fmt(r.dense_count), fmt(r.sparse_count),
             fmt_ci(r.ratio, r.ratio_ci_low, r.ratio_ci_high),
             f"{fmt(r.dense_stays_above)} / {fmt(r.sparse_stays_above)}",
             fmt_ci(r.ratio_stays_above, r.ratio_stays_above_ci_low, r.ratio_stays_above_ci_high),
             fmt_ci(r.prompt_ratio, r.prompt_ratio_ci_low, r.prompt_ratio_ci_high) if per_prompt else "-",
             fmt(r.prompt_pairs) if per_prompt else "-",
             f"{fmt(r.dense_prompts_dropped)} / {fmt(r.sparse_prompts_dropped)}" if per_prompt else "-",
             html.escape(str(r.behaviour_gate)), f"{fmt(r.dense_faithfulness)} / {fmt(r.sparse_faithfulness)}",
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
                 labels: Mapping[str, Labels] | None = None, left_out: list[str] | None = None) -> Path:
    """Render report.html (and report_files/*.png) from the comparison tables in `output_dir` and the settings
    saved beside them; the example graphs are drawn from the store at `store_uri` when given; `left_out`: parts
    not computed, each with why, listed under the heading. Returns the HTML path."""
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
    if left_out:
        parts.append("<p class=note>Not in this report: " + "; ".join(html.escape(s) for s in left_out) + ".</p>")

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
        headline = circuits.loc[circuits["headline"], "gates"]
        parts.append(f"<h2>Component circuits</h2><p class=note>Explained effect (activation patching) against "
                     "the number of heads kept and of edges kept that carry signal (on a path from the inputs to the "
                     "logits; heads that write nothing on any run are no component). Heads are ranked by exact "
                     "single-head patching, edges by EAP-IG, with the gates handled the same way in ranking and "
                     "patching: frozen to the clean run's masks (the circuit as a fixed structure, so one gate flip "
                     "cannot set a count) or recomputed by every run (the model as it runs); the headline mode is "
                     f"{html.escape(headline.iloc[0] if len(headline) else '-')} (*). Counts reaching {fmt(target)}: "
                     "the first crossing and the smallest count from which every evaluated count stays above it "
                     "(dense grid around the crossing). Edges join components summed over positions; role_edges are "
                     "the same edges at the tokens of one role (the task's token roles: IOI's S1, IO, S2, ..., the "
                     "last token end), pooled over templates and lengths. Pooled: one circuit "
                     f"over all the task's prompts, {confidence} bootstrap CIs over prompts (curve re-read, ranking "
                     "fixed); ratios only where both models do the task (behaviour gate: clean logit diff and "
                     "accuracy). Per prompt: one circuit per prompt, mean(dense) / mean(sparse) over the prompts both "
                     "reach the target with, prompts with a clean - corrupted gap under the floor dropped. "
                     "Faithfulness: Spearman correlation of EAP scores with exact patching (heads: all; edges: a "
                     f"sample). Paper's ratios: a range over {html.escape(circuits['paper_tasks'].iloc[0])}.</p>")
        if curves is not None and len(curves):
            parts.append(f'<img src="{plot_circuit_curves(curves, circuits, figures / "circuit_curves.png")}">')
        prompts = _read(output_dir, "circuit_prompts")
        if prompts is not None and prompts["count_at_target"].notna().any():
            parts.append("<p class=note>One circuit per prompt: its size on the dense (x) and the sparse (y) model, "
                         "at the same explained effect; below the diagonal the sparse circuit is smaller.</p>"
                         f'<img src="{plot_prompt_circuits(prompts, circuits, figures / "prompt_circuits.png")}">')
        parts.append(table_html(["task", "gates", "kind", "dense", "sparse", "dense/sparse [CI]",
                                 "stays above (dense / sparse)", "dense/sparse stays above [CI]",
                                 "per prompt dense/sparse [CI]", "prompt pairs", "dropped (dense / sparse)",
                                 "behaviour gate", "faithfulness (dense / sparse)", "paper", "status"],
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
    """The most influential non-sink attention edge of one example graph and its top QK pairs (figure and table)."""
    if example.layer is None or pd.isna(example.layer):
        return (f"<p class=note>{example.variant}: no edge on the path to the logit is carried by an attention head "
                "outside the BOS sink.</p>")
    where = (f"{example.variant}: most influential non-sink attention edge L{int(example.layer)} H{int(example.head)}, "
             f"query {int(example.query_pos)} -> key {int(example.key_pos)}; head part {fmt(example.head_part)} "
             f"(logit influence {fmt(example.influence)}) of graph edge "
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
