"""How the comparison report writes numbers and names: `fmt` for every number shown, metric titles, and
readable names for features and QK components (`L{layer}:F{feature}`, with a label when one is given)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import pandas as pd

from comparison.config import CompareConfig
from comparison.graph_metrics import share_name

Labels = Mapping[tuple[int, int], str]

METRIC_TITLES = {
    "n_nodes_kept": "nodes kept", "n_edges_kept": "edges kept", "n_features_kept": "feature nodes kept",
    "n_heads_any": "heads with any part", "n_heads_carrying": "heads carrying (influence share >= min, no sink)",
    "n_attention_edges": "attention edges carrying influence (no sink)",
    "n_attention_edges_cover": "attention edges for the cover share of influence (no sink)",
    "n_sink_attention_edges": "attention edges into BOS (sink)", "sink_share": "sink share of head influence",
    "n_qk_attributed_edges": "QK-attributed attention edges (capped)",
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
        return f"share of score by top {metric[6:].split('_')[0]} QK pairs (influence-weighted median, no sink)"
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
