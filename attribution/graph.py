"""The attribution graph of one prompt, in circuit-tracer's node order with rows = targets.

Nodes: selected features (in (layer, pos, feature) order), error nodes (layer-major: n_sel + l * P + p),
token embeddings (P), logit targets. adjacency[t, s] is the exact direct effect of source s on target
t in the local replacement model: a feature's pre-activation readout, or a demeaned logit.

Only features and logits have incoming edges, so the graph keeps just their rows (`rows`, [n_sel +
n_logits, N]): linear in positions, where the [N, N] matrix (N = n_sel + (L + 1) P + n_logits, mostly the
rows of error and token nodes, all zero) is quadratic. `adjacency` builds the dense matrix on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attribution.config import GraphConfig
from attribution.nodes import LocalReplacementModel
from attribution.propagate import attribution_rows, feature_targets, logit_targets, n_source_columns
from attribution.prune import partial_influences, row_index

NODE_KINDS = ("feature", "error", "token", "logit")


@dataclass
class AttributionGraph:
    """Adjacency plus what it needs to be read: node identities, activations, logit targets."""

    prompt: str
    tokens: torch.Tensor  # [P] long
    n_layers: int
    active_features: torch.Tensor  # [n_active, 3] long (layer, pos, feature)
    activations: torch.Tensor  # [n_active]
    selected: torch.Tensor  # [n_sel] long, indices into active_features, ascending
    logit_tokens: torch.Tensor  # [n_logits] long
    logit_probs: torch.Tensor  # [n_logits]
    rows: torch.Tensor  # [n_sel + n_logits, N] the rows of the nodes `row_nodes` (selected features, logits)
    node_constant: torch.Tensor  # [N] part of a target's value due to no node (b_enc, b_dec, BOS MLP, biases)
    node_value: torch.Tensor  # [N] feature pre-activation / demeaned (pre-cap) logit; 0 for errors and tokens
    attn_softcap: float | None = None  # the model's attention soft-cap: gate logit = cap * tanh(score / cap) + b
    final_softcap: float | None = None  # the model's final-logit soft-cap: logit nodes are the pre-cap logits z,
    # logit_probs are from the model's output cap * tanh(z / cap)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_selected(self) -> int:
        return len(self.selected)

    @property
    def n_nodes(self) -> int:
        return self.rows.shape[1]

    @property
    def row_nodes(self) -> torch.Tensor:
        """[n_sel + n_logits] the node of each row of `rows`: the selected features, then the logits."""
        return torch.cat([torch.arange(self.n_selected), torch.arange(self.logit_start, self.n_nodes)])

    @property
    def adjacency(self) -> torch.Tensor:
        """The dense [N, N] matrix, rows = targets (zero rows for errors and tokens). O(N^2) memory: for
        small graphs and tests; the stage works on `rows`."""
        dense = torch.zeros(self.n_nodes, self.n_nodes)
        dense[self.row_nodes] = self.rows
        return dense

    def edge_weights(self, targets: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """adjacency[targets, sources] without the dense matrix (0 where the target has no row).  -> [E]"""
        row = row_index(self.row_nodes, self.n_nodes)[targets]
        weights = torch.zeros(len(targets))
        has_row = row >= 0
        weights[has_row] = self.rows[row[has_row], sources[has_row]]
        return weights

    def nonzero_edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets, sources, weights) of every nonzero edge, in (target, source) order."""
        row, source = self.rows.nonzero().unbind(1)
        return self.row_nodes[row], source, self.rows[row, source]

    @property
    def error_start(self) -> int:
        return self.n_selected

    @property
    def token_start(self) -> int:
        return self.n_selected + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    def node_table(self) -> dict[str, torch.Tensor]:
        """Per node: kind (index into NODE_KINDS), layer, pos, feature (feature id / token id / -1)."""
        n_sel, n_layers, n_pos, n_logits = self.n_selected, self.n_layers, self.n_pos, len(self.logit_tokens)
        feats = self.active_features[self.selected]
        error_layer, error_pos = torch.arange(n_layers).repeat_interleave(n_pos), torch.arange(n_pos).repeat(n_layers)
        kind = torch.cat([torch.full((n_sel,), 0), torch.full((n_layers * n_pos,), 1),
                          torch.full((n_pos,), 2), torch.full((n_logits,), 3)])
        layer = torch.cat([feats[:, 0], error_layer, torch.full((n_pos,), -1), torch.full((n_logits,), n_layers + 1)])
        pos = torch.cat([feats[:, 1], error_pos, torch.arange(n_pos), torch.full((n_logits,), n_pos - 1)])
        feature = torch.cat([feats[:, 2], torch.full((n_layers * n_pos,), -1), self.tokens, self.logit_tokens])
        return {"kind": kind, "layer": layer, "pos": pos, "feature": feature}

    def node_ids(self) -> list[str]:
        """`{layer}_{feature}_{pos}`, errors `{layer}_-1_{pos}`, tokens `E_{token}_{pos}`, logits
        `{n_layers + 1}_{token}_{pos}` (circuit-tracer's frontend ids)."""
        table = {key: value.tolist() for key, value in self.node_table().items()}
        return [node_id(*row) for row in zip(table["kind"], table["layer"], table["feature"], table["pos"])]


def node_id(kind: int, layer: int, feature: int, pos: int) -> str:
    if NODE_KINDS[kind] == "token":
        return f"E_{feature}_{pos}"
    return f"{layer}_{feature}_{pos}"


def attribute(lrm: LocalReplacementModel, config: GraphConfig, prompt: str = "") -> AttributionGraph:
    """The attribution graph of the prompt frozen in `lrm`."""
    logit_rows, logit_constant = attribution_rows(lrm, logit_targets(lrm), **_sweep_options(config))
    n_active = lrm.n_active
    if config.max_feature_nodes is None or config.max_feature_nodes >= n_active:
        selected = torch.arange(n_active)
        feature_rows, feature_constant = attribution_rows(lrm, feature_targets(lrm, selected),
                                                          **_sweep_options(config))
    else:
        selected, feature_rows, feature_constant = _visit_by_influence(lrm, logit_rows, config)
    return _assemble(lrm, prompt, selected, feature_rows, feature_constant, logit_rows, logit_constant)


def _sweep_options(config: GraphConfig) -> dict:
    return {"min_block_rows": config.min_block_rows, "max_block_rows": config.max_block_rows,
            "max_grad_bytes": config.max_grad_mib * 2**20}


def graph_columns(lrm: LocalReplacementModel, selected: torch.Tensor) -> torch.Tensor:
    """The source columns a graph keeps, in node order: the selected features, then errors and tokens."""
    return torch.cat([selected, torch.arange(lrm.n_active, n_source_columns(lrm))])


def _visit_by_influence(lrm: LocalReplacementModel, logit_rows: torch.Tensor, config: GraphConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """circuit-tracer's feature selection: visit features in order of estimated logit influence,
    refreshed after every update_interval * batch_size features.
    -> (selected, rows [n_sel, graph columns], constants), sorted"""
    n_active, n_columns, n_logits = lrm.n_active, n_source_columns(lrm), len(logit_rows)
    budget = config.max_feature_nodes
    edge_rows = torch.zeros(budget + n_logits, n_columns + n_logits)
    row_to_node = torch.zeros(budget + n_logits, dtype=torch.long)
    edge_rows[:n_logits, :n_columns] = logit_rows
    row_to_node[:n_logits] = torch.arange(n_logits) + n_columns
    constants = torch.zeros(budget + n_logits)
    visited = torch.zeros(n_active, dtype=torch.bool)
    filled = n_logits
    while filled - n_logits < budget:
        scores = partial_influences(edge_rows[:filled], lrm.logit_probs, row_to_node[:filled])
        rank = torch.argsort(scores[:n_active], descending=True)
        queue = min(config.update_interval * config.batch_size, budget - (filled - n_logits))
        pending = rank[~visited[rank]][:queue]
        rows, constant = attribution_rows(lrm, feature_targets(lrm, pending), **_sweep_options(config))
        edge_rows[filled:filled + len(pending), :n_columns] = rows
        constants[filled:filled + len(pending)] = constant
        row_to_node[filled:filled + len(pending)] = pending
        visited[pending] = True
        filled += len(pending)
    order = torch.argsort(row_to_node[n_logits:])
    selected = row_to_node[n_logits:][order]
    rows = edge_rows.index_select(1, graph_columns(lrm, selected))[order + n_logits]  # the graph's columns first: small
    return selected, rows, constants[n_logits:][order]


def _assemble(lrm: LocalReplacementModel, prompt: str, selected: torch.Tensor, feature_rows: torch.Tensor,
              feature_constant: torch.Tensor, logit_rows: torch.Tensor, logit_constant: torch.Tensor
              ) -> AttributionGraph:
    """The rows of the selected features and the logits over the graph's columns, in node order.
    feature_rows: [n_sel, graph columns] (or, with every feature selected, all source columns, the same)."""
    n_sel, n_logits = len(selected), len(logit_rows)
    columns = graph_columns(lrm, selected)
    n_nodes = len(columns) + n_logits
    rows = torch.zeros(n_sel + n_logits, n_nodes)
    rows[:n_sel, :len(columns)] = feature_rows
    rows[n_sel:, :len(columns)] = logit_rows[:, columns]
    layer, feat = lrm.features[selected, 0], lrm.features[selected, 2]
    node_constant = torch.zeros(n_nodes)
    node_constant[:n_sel] = feature_constant + lrm.clt.b_enc[layer, feat] + lrm.feature_norm_constants(selected)
    node_constant[n_nodes - n_logits:] = logit_constant + lrm.logit_norm_constants()
    node_value = torch.zeros(n_nodes)
    node_value[:n_sel] = lrm.feature_pre_activations(selected)
    node_value[n_nodes - n_logits:] = lrm.demeaned_logits()
    return AttributionGraph(
        prompt=prompt, tokens=lrm.prompt.tokens.clone(), n_layers=lrm.n_layers,
        active_features=lrm.features.clone(), activations=lrm.activations.clone(), selected=selected.clone(),
        logit_tokens=lrm.logit_tokens.clone(), logit_probs=lrm.logit_probs.clone(), rows=rows,
        node_constant=node_constant, node_value=node_value,
        attn_softcap=lrm.model.attn_softcap, final_softcap=lrm.model.final_softcap,
    )
