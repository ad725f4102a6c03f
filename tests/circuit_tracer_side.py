"""The circuit-tracer side of the frontend export checks: run with the python of a venv that has circuit-tracer
0.5.0 (bench/attribution_vs_circuit_tracer.py's `ensure_ct_venv` builds one), never imported by the suite.

    python tests/circuit_tracer_side.py schemas tests/data
        writes circuit_tracer_graph_schema.json and circuit_tracer_feature_schema.json, the JSON schemas of
        circuit-tracer's pydantic models, which tests/test_attribution_frontend.py checks exports against
    python tests/circuit_tracer_side.py reference GRAPH.pt OUT_DIR
        runs circuit-tracer's own `create_graph_files` on a graph saved by the test (tensors + settings)
    python tests/circuit_tracer_side.py validate EXPORT_DIR SLUG
        validates an export with circuit-tracer's pydantic models, and loads it through circuit-tracer's own
        local server as its frontend does (graph list, graph, every feature node's panel)
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

SCHEMA_COMMAND = "<circuit-tracer venv>/bin/python tests/circuit_tracer_side.py schemas tests/data"


def schemas(out_dir: Path) -> None:
    import importlib.metadata

    from circuit_tracer.frontend import feature_models, graph_models

    version = importlib.metadata.version("circuit-tracer")
    for name, model in (("graph", graph_models.Model), ("feature", feature_models.Model)):
        schema = {"$comment": f"generated from circuit-tracer {version}'s pydantic model by: {SCHEMA_COMMAND}",
                  **model.model_json_schema()}
        (out_dir / f"circuit_tracer_{name}_schema.json").write_text(json.dumps(schema, indent=2) + "\n")


def reference(graph_path: Path, out_dir: Path) -> None:
    import torch
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph
    from circuit_tracer.utils.create_graph_files import create_graph_files
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    saved = torch.load(graph_path)
    cfg = UnifiedConfig(n_layers=saved["n_layers"], d_model=1, d_head=1, n_heads=1, d_mlp=1,
                        d_vocab=saved["vocab_size"], tokenizer_name=saved["tokenizer_dir"], model_name="tiny",
                        original_architecture="LlamaForCausalLM")
    graph = Graph(input_string=saved["prompt"], input_tokens=saved["tokens"], active_features=saved["active_features"],
                  adjacency_matrix=saved["adjacency"], cfg=cfg, selected_features=saved["selected_features"],
                  activation_values=saved["activation_values"],
                  logit_targets=[LogitTarget(token_str=s, vocab_idx=i) for s, i in saved["logit_targets"]],
                  logit_probabilities=saved["logit_probabilities"], scan=saved["scan"])
    create_graph_files(graph, saved["slug"], str(out_dir), node_threshold=saved["node_threshold"],
                       edge_threshold=saved["edge_threshold"])


def validate(export_dir: Path, slug: str) -> None:
    from circuit_tracer.frontend import feature_models, graph_models
    from circuit_tracer.frontend.local_server import serve

    data = json.loads((export_dir / f"{slug}.json").read_text(encoding="utf-8"))
    graph_models.Model.model_validate(data)
    server = serve(data_dir=str(export_dir), port=0)
    base = f"http://127.0.0.1:{server.httpd.server_address[1]}"
    try:
        def get(path: str):
            with urllib.request.urlopen(base + path, timeout=30) as response:
                return json.loads(response.read().decode("utf-8"))

        listed = get("/data/graph-metadata.json")["graphs"]
        assert slug in [g["slug"] for g in listed], f"{slug} not in graph-metadata.json"
        served = get(f"/graph_data/{slug}.json")
        assert served == data, "the server returned another graph file"
        scan = served["metadata"]["scan"]
        features = [n for n in served["nodes"] if n["feature_type"] == "cross layer transcoder"]
        loaded = 0
        if scan.startswith("./"):  # init-feature-examples.js loadFeature: `${scan}/${featureIndex}.json`
            for node in features:
                panel = get(f"{scan[1:]}/{node['feature']}.json")
                feature_models.Model.model_validate(panel)
                loaded += 1
        print(json.dumps({"nodes": len(served["nodes"]), "links": len(served["links"]), "panels": loaded}))
    finally:
        server.stop()


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    if command == "schemas":
        schemas(Path(args[0]))
    elif command == "reference":
        reference(Path(args[0]), Path(args[1]))
    else:
        validate(Path(args[0]), args[1])
