"""networkx view and circuit-tracer frontend export of stored graphs.

The export is checked against circuit-tracer's own pydantic models in two ways: in the suite, against the
JSON schemas generated from them (tests/data/circuit_tracer_*_schema.json, made by tests/circuit_tracer_side.py);
and, where a venv with circuit-tracer 0.5.0 exists (CIRCUIT_TRACER_VENV, default the bench's
/tmp/attribution-bench/ct-venv), by circuit-tracer itself: its `create_graph_files` on the same graph writes
the same file (less our extra fields), and its local server serves the graph and every feature panel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import networkx as nx
import pyarrow as pa
import pytest
import torch

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.frontend import FrontendExportError, cantor, export_frontend, frontend_graph, to_networkx
from attribution.stage import run
from attribution.store import open_store
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import tiny_model
from tests.test_attribution import N_FEATURES, TINY, random_clt
from tests.test_attribution_store import make_record
from transcoders.clt import save_clt
from transcoders.features import EXAMPLES_SCHEMA, FEATURES_SCHEMA, write_dashboards

DATA = Path(__file__).parent / "data"
CT_NODE_FIELDS = ["node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
                  "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp", "influence", "activation"]
PROMPT = "The cat sat on"


def circuit_tracer_python() -> Path:
    """The python of a venv with circuit-tracer, or a skip saying where it was looked for."""
    venv = Path(os.environ.get("CIRCUIT_TRACER_VENV", "/tmp/attribution-bench/ct-venv"))
    if not list(venv.glob("lib/python*/site-packages/circuit_tracer")):
        pytest.skip(f"no circuit-tracer venv at {venv} (circuit-tracer pins transformers<=4.57.3, so it lives in a "
                    "venv of its own: set CIRCUIT_TRACER_VENV, or run bench/attribution_vs_circuit_tracer.py, "
                    "which builds one)")
    return venv / "bin" / "python"


def run_circuit_tracer_side(*args: str) -> str:
    result = subprocess.run([str(circuit_tracer_python()), str(Path(__file__).parent / "circuit_tracer_side.py"),
                             *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def dashboards_table(n_layers: int, n_features: int) -> tuple[pa.Table, pa.Table]:
    """Dashboards for every feature: a label, logits, 2 top and 3 random contexts with distinct values."""
    keys = [(layer, feature) for layer in range(n_layers) for feature in range(n_features)]
    features = pa.table({
        "layer": [k[0] for k in keys], "feature": [k[1] for k in keys], "density": [0.01 * (1 + k[1]) for k in keys],
        "n_active": [10] * len(keys), "mean_activation": [1.0] * len(keys), "max_activation": [3.0] * len(keys),
        "label": [f"feature {layer}/{feature}" for layer, feature in keys], "label_source": ["auto"] * len(keys),
        **{f"{kind}_tokens": [[f"{kind[0]}{k[1]}", "é"] for k in keys] for kind in ("promoted", "suppressed", "input")},
        **{f"{kind}_token_ids": [[97, 98]] * len(keys) for kind in ("promoted", "suppressed", "input")},
    }, schema=FEATURES_SCHEMA)
    rows = {name: [] for name in EXAMPLES_SCHEMA.names}
    for layer, feature in keys:
        for kind, acts in (("top", [3.0, 2.5]), ("random", [0.5, 1.0, 2.0])):
            for rank, act in enumerate(acts):
                for name, value in (("layer", layer), ("feature", feature), ("kind", kind), ("rank", rank),
                                    ("activation", act), ("block", 0), ("position", 2), ("window_index", 1),
                                    ("tokens", [97, 98, 99]), ("token_strings", ["a", "b", "c"]),
                                    ("activations", [0.0, act, 0.1])):
                    rows[name].append(value)
    return features, pa.table(rows, schema=EXAMPLES_SCHEMA)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A gated tiny model's graph (every edge stored, head loadings and QK pairs), its CLT with dashboards,
    exported with slug "cat"."""
    root = tmp_path_factory.mktemp("frontend")
    small = TINY.model_copy(update={"max_position_embeddings": 24})
    model, tokenizer = tiny_model(small)
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.3, 0.3, gated.offsets.numel()).view_as(gated.offsets))
    gated.save(root / "sparse", tokenizer)
    clt = random_clt(small.n_layers, small.d_model, N_FEATURES, seed=0)
    with torch.no_grad():  # features 0..L-1 of layer 0 never fire: their ids would collide with error ids
        clt.threshold[0, :small.n_layers] = 1e9
    save_clt(clt, root / "clt")
    write_dashboards(root / "clt", *dashboards_table(small.n_layers, N_FEATURES), {})
    config = AttributionStageConfig(graph=GraphConfig(), store_edges="all",
                                    attention=AttentionAttributionConfig(max_attention_edges=20))
    summary = run(config, root / "sparse", root / "clt", [PROMPT], root / "graphs", "sparse", progress=False)
    store = open_store(root / "graphs")
    graph_id = summary["graphs"][0]["graph_id"]
    path = export_frontend(store, graph_id, root / "web", slug="cat", tokenizer=tokenizer)
    return store, graph_id, tokenizer, path


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


def test_export_follows_circuit_tracers_schema_ids_and_extras(exported):
    store, graph_id, tokenizer, path = exported
    data = json.loads(path.read_text(encoding="utf-8"))
    jsonschema.validate(data, json.loads((DATA / "circuit_tracer_graph_schema.json").read_text()))
    stored = store.load_graph(graph_id)
    n_layers = int(stored.info["n_layers"])
    assert data["metadata"]["scan"] == "./graph_data/features/clt" and data["metadata"]["transcoder_list"] == []
    assert data["metadata"]["prompt_tokens"] == [tokenizer.decode(int(t)) for t in stored.info["tokens"]]
    assert all(list(node) == CT_NODE_FIELDS for node in data["nodes"])
    by_type = {}
    for node in data["nodes"]:
        by_type.setdefault(node["feature_type"], []).append(node)
    assert set(by_type) == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    for node in by_type["cross layer transcoder"]:
        layer, feature, pos = map(int, node["node_id"].split("_"))
        assert (node["layer"], node["ctx_idx"], node["feature"]) == (str(layer), pos, cantor(layer, feature))
        assert node["jsNodeId"] == f"{layer}_{feature}-0" and node["clerp"] == f"feature {layer}/{feature}"
    for node in by_type["mlp reconstruction error"]:
        assert node["node_id"] == f"0_{node['layer']}_{node['ctx_idx']}" and node["feature"] == -1
        assert node["jsNodeId"] == f"{node['layer']}_{node['ctx_idx']}-0"
    assert [n["node_id"] for n in by_type["embedding"]] == [f"E_{t}_{p}" for p, t in enumerate(stored.info["tokens"])]
    logits = by_type["logit"]
    assert [n["feature"] for n in logits] == list(stored.info["logit_tokens"])
    assert [n["is_target_logit"] for n in logits] == [True] + [False] * (len(logits) - 1)
    for node in logits:
        token = node["feature"]
        assert node["node_id"] == f"{n_layers + 1}_{token}_{len(stored.info['tokens']) - 1}"
        assert node["clerp"] == f'Output "{tokenizer.decode(token)}" (p={node["token_prob"]:.3f})'
    # extras: each link's head loadings sum to its weight per layer; QK splits sum to their gate logits
    with_heads = [link for link in data["links"] if link["heads"]]
    assert with_heads
    for link in with_heads:
        for layer in {h["layer"] for h in link["heads"]}:
            total = sum(h["weight"] for h in link["heads"] if h["layer"] == layer)
            assert abs(total - link["weight"]) <= 1e-4 * max(1.0, abs(link["weight"]))
    assert data["qk_pairs"] and len(data["qk_pairs"]) == len(
        stored.qk_pairs[["layer", "head", "query_pos", "key_pos"]].drop_duplicates())
    for edge in data["qk_pairs"]:
        total = sum(t["value"] for t in edge["terms"] if t["kind"] in ("pair", "pair_rest", "offset"))
        assert abs(total - edge["gate_logit"]) <= 1e-4 * max(1.0, abs(edge["gate_logit"]))
    index = json.loads((path.parent / "graph-metadata.json").read_text())
    assert index["graphs"] == [data["metadata"]]


def test_feature_panels_follow_circuit_tracers_feature_schema(exported):
    _, _, _, path = exported
    data = json.loads(path.read_text(encoding="utf-8"))
    schema = json.loads((DATA / "circuit_tracer_feature_schema.json").read_text())
    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    files = sorted((path.parent / "features" / "clt").iterdir())
    assert sorted(f.name for f in files) == sorted({f"{n['feature']}.json" for n in features})
    panel = json.loads(files[0].read_text(encoding="utf-8"))
    jsonschema.validate(panel, schema)
    assert int(files[0].stem) == panel["index"] == cantor(panel["layer"], panel["feature"])
    assert [q["quantile_name"] for q in panel["examples_quantiles"]] == [
        "Top activations", "Random activating contexts, lowest to highest"]
    top = panel["examples_quantiles"][0]["examples"]
    assert [e["tokens_acts_list"][e["train_token_ind"]] for e in top] == [3.0, 2.5] and top[0]["tokens"] == ["a", "b", "c"]
    assert panel["top_logits"] == [f"p{panel['feature']}", "é"] and panel["act_max"] == 3.0
    assert len(panel["quantile_values"]) == 100 and panel["quantile_values"][-1] == 2.0  # the sample's largest
    assert panel["quantile_values"] == sorted(panel["quantile_values"]) and sum(panel["histogram"]) == 3


def test_export_equals_circuit_tracers_create_graph_files(exported, tmp_path):
    store, graph_id, tokenizer, path = exported
    stored = store.load_graph(graph_id)
    ours = json.loads(path.read_text(encoding="utf-8"))
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"  # transformers 4.57 knows no "TokenizersBackend"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("backend", None)
    config_path.write_text(json.dumps({**tokenizer_config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    nodes, edges = stored.nodes, stored.edges
    assert stored.info["edges_stored"] == "all"
    adjacency = torch.zeros(len(nodes), len(nodes))
    adjacency[torch.tensor(edges["target"].to_numpy()).long(), torch.tensor(edges["source"].to_numpy()).long()] = (
        torch.tensor(edges["weight"].to_numpy()))
    features = nodes[nodes["kind"] == "feature"]
    torch.save({
        "prompt": stored.info["prompt"], "tokens": torch.tensor(list(stored.info["tokens"])),
        "active_features": torch.tensor(features[["layer", "pos", "feature"]].to_numpy()).long(),
        "selected_features": torch.arange(len(features)), "activation_values": torch.tensor(features["activation"].to_numpy()),
        "adjacency": adjacency, "n_layers": int(stored.info["n_layers"]), "vocab_size": len(tokenizer),
        "tokenizer_dir": str(tokenizer_dir), "scan": ours["metadata"]["scan"], "slug": "cat",
        "logit_targets": [(tokenizer.decode(int(t)), int(t)) for t in stored.info["logit_tokens"]],
        "logit_probabilities": torch.tensor(list(stored.info["logit_probs"])), "node_threshold": 0.8,
        "edge_threshold": 0.98,
    }, tmp_path / "graph.pt")
    run_circuit_tracer_side("reference", str(tmp_path / "graph.pt"), str(tmp_path / "ct"))
    theirs = json.loads((tmp_path / "ct" / "cat.json").read_text(encoding="utf-8"))
    assert ours["metadata"] == theirs["metadata"] and ours["qParams"] == theirs["qParams"]
    assert [n["node_id"] for n in ours["nodes"]] == [n["node_id"] for n in theirs["nodes"]]
    for mine, reference in zip(ours["nodes"], theirs["nodes"]):
        mine_influence, reference_influence = mine.pop("influence"), reference.pop("influence")
        if mine["feature_type"] == "cross layer transcoder":  # ours carry the dashboards' labels
            assert mine.pop("clerp").startswith("feature ") and reference.pop("clerp") == ""
        assert mine == reference
        assert (mine_influence is None) == (reference_influence is None)
        if mine_influence is not None:
            assert abs(mine_influence - reference_influence) <= 1e-5
    assert [{k: v for k, v in link.items() if k != "heads"} for link in ours["links"]] == theirs["links"]
    assert json.loads((path.parent / "graph-metadata.json").read_text()) == json.loads(
        (tmp_path / "ct" / "graph-metadata.json").read_text())


def test_circuit_tracers_server_and_models_load_the_export(exported):
    _, _, _, path = exported
    loaded = json.loads(run_circuit_tracer_side("validate", str(path.parent), "cat").splitlines()[-1])
    data = json.loads(path.read_text(encoding="utf-8"))
    assert loaded == {"nodes": len(data["nodes"]), "links": len(data["links"]),
                      "panels": sum(n["feature_type"] == "cross layer transcoder" for n in data["nodes"])}


def test_error_ids_colliding_with_layer_zero_features_and_a_missing_tokenizer_are_refused(exported):
    store, graph_id, tokenizer, _ = exported
    stored = store.load_graph(graph_id)
    with pytest.raises(FrontendExportError, match="tokenizer"):
        frontend_graph(stored, None)
    data = frontend_graph(stored, tokenizer)
    used = {n["node_id"] for n in data["nodes"]}
    nodes = stored.nodes.copy()
    error = nodes[(nodes["kind"] == "error") & nodes["kept"]
                  & nodes.apply(lambda r: f"0_{r.layer}_{r.pos}" in used, axis=1)].iloc[0]
    feature = nodes[(nodes["kind"] == "feature") & nodes["node_id"].map(lambda i: i in used)].index[0]
    nodes.loc[feature, ["layer", "feature", "pos"]] = [0, int(error["layer"]), int(error["pos"])]
    colliding = dataclasses.replace(stored, nodes=nodes)
    with pytest.raises(FrontendExportError, match=f"'0_{error['layer']}_{error['pos']}' names both"):
        frontend_graph(colliding, tokenizer)
    unique = frontend_graph(colliding, tokenizer, unique_error_ids=True)
    errors = [n for n in unique["nodes"] if n["feature_type"] == "mlp reconstruction error"]
    assert errors and all(n["node_id"] == f"{n['layer']}_-1_{n['ctx_idx']}" for n in errors)
    assert len({n["node_id"] for n in unique["nodes"]}) == len(unique["nodes"])
