"""networkx view and circuit-tracer frontend JSON of stored graphs."""

from __future__ import annotations

import json

import networkx as nx
import pyarrow as pa

from attribution.frontend import export_frontend, to_networkx
from attribution.store import open_store
from tests.test_attribution_store import make_record
from transcoders.features import EXAMPLES_SCHEMA, FEATURES_SCHEMA, write_dashboards

CT_NODE_FIELDS = {"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                  "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"}


def test_networkx_holds_the_kept_graph(tmp_path):
    graph, pruned, record = make_record(edges="all")
    store = open_store(tmp_path)
    store.write(record)
    stored = store.load_graph(record.graph_id)
    view = to_networkx(stored)
    assert view.number_of_nodes() == int(pruned.node_mask.sum())
    kept = pruned.edge_mask & (graph.adjacency != 0) & pruned.node_mask[:, None] & pruned.node_mask[None, :]
    assert view.number_of_edges() == int(kept.sum())
    assert nx.is_directed_acyclic_graph(view)
    ids = graph.node_ids()
    target, source = kept.nonzero()[0].tolist()
    assert view.edges[ids[source], ids[target]]["weight"] == float(graph.adjacency[target, source])
    full = to_networkx(stored, kept_only=False)
    assert full.number_of_nodes() == graph.n_nodes and full.number_of_edges() == int((graph.adjacency != 0).sum())


def test_frontend_json_has_circuit_tracers_shape(tmp_path):
    graph, pruned, record = make_record()
    store = open_store(tmp_path / "store")
    store.write(record)
    path = export_frontend(store, record.graph_id, tmp_path / "web", slug="cat")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    assert data["metadata"]["slug"] == "cat" and data["metadata"]["prompt"] == graph.prompt
    assert len(data["metadata"]["prompt_tokens"]) == graph.n_pos
    assert all(set(node) == CT_NODE_FIELDS for node in data["nodes"])
    node_ids = {node["node_id"] for node in data["nodes"]}
    assert len(node_ids) == len(data["nodes"])
    assert all(link["source"] in node_ids and link["target"] in node_ids for link in data["links"])
    kinds = [node["feature_type"] for node in data["nodes"]]
    assert kinds.count("embedding") == graph.n_pos and kinds.count("logit") == len(graph.logit_tokens)
    assert sum(node["is_target_logit"] for node in data["nodes"]) == 1
    index = json.loads((tmp_path / "web" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["cat"]


def test_feature_labels_from_the_clt_dashboards_fill_clerp_and_networkx(tmp_path):
    graph, pruned, record = make_record()
    clt_dir = tmp_path / "clt"
    graphs = record.tables["graphs"]
    record.tables["graphs"] = graphs.set_column(graphs.schema.get_field_index("clt"), "clt",
                                                pa.array([json.dumps({"dir": str(clt_dir), "meta": None})]))
    store = open_store(tmp_path / "store")
    store.write(record)
    stored = store.load_graph(record.graph_id)
    assert all(label is None for _, label in to_networkx(stored).nodes(data="label"))  # no dashboards yet
    features = stored.nodes[stored.nodes["kind"] == "feature"][["layer", "feature"]].drop_duplicates()
    labels = {(int(layer), int(feature)): f"feature {layer}/{feature}" for layer, feature in features.values}
    write_dashboards(clt_dir, pa.table({
        "layer": [key[0] for key in labels], "feature": [key[1] for key in labels],
        "density": [0.1] * len(labels), "n_active": [1] * len(labels), "mean_activation": [1.0] * len(labels),
        "max_activation": [1.0] * len(labels), "label": list(labels.values()), "label_source": ["auto"] * len(labels),
        **{f"{kind}_tokens": [["a"]] * len(labels) for kind in ("promoted", "suppressed", "input")},
        **{f"{kind}_token_ids": [[97]] * len(labels) for kind in ("promoted", "suppressed", "input")},
    }, schema=FEATURES_SCHEMA), EXAMPLES_SCHEMA.empty_table(), {})
    data = json.loads(export_frontend(store, record.graph_id, tmp_path / "web", slug="cat").read_text())
    feature_nodes = [node for node in data["nodes"] if node["feature_type"] == "cross layer transcoder"]
    assert feature_nodes and all(node["clerp"] == "feature {}/{}".format(*node["jsNodeId"].split("-")[0].split("_"))
                                 for node in feature_nodes)
    assert all(node["clerp"] == "" for node in data["nodes"] if node["feature_type"] in ("embedding", "error"))
    view = to_networkx(stored)
    for _, attributes in view.nodes(data=True):
        expected = labels[(attributes["layer"], attributes["feature"])] if attributes["kind"] == "feature" else None
        assert attributes["label"] == expected
