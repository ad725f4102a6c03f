"""The sparse-interp command line on the tiny model: `attribute` stores exactly what Attributor computes,
`query` prints the store's tables, `export` writes the frontend JSON, `run` runs the pipeline, `serve`
hands the store to the viewer, and every bad value is one line on stderr naming it."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.frontend import FrontendExportError, export_frontend
from attribution.schema import TABLES
from attribution.stage import Attributor, PromptItem, settings_json
from attribution.store import open_store
from cli import attribute
from cli.main import build_parser, main
from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import GatedModel
from sparse_attention.models import TinyModelConfig, tiny_model
from tests.test_attribution import random_clt
from transcoders.clt import save_clt

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The cat sat on", "Hello world"]
SETTINGS = ["--max-attention-edges", "20", "--node-threshold", "0.7", "--quiet"]
CONFIG = AttributionStageConfig(graph=GraphConfig(node_threshold=0.7),
                                attention=AttentionAttributionConfig(max_attention_edges=20))


def cli(argv: list[str]) -> int:
    """main's exit status, argparse's exits included."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A CLT for the default tiny model, a gated checkpoint of it, and a store the CLI filled."""
    root = tmp_path_factory.mktemp("cli")
    shape = TinyModelConfig()  # what `--model tiny` loads
    save_clt(random_clt(shape.n_layers, shape.d_model, 16, seed=0), root / "clt")
    model, tokenizer = tiny_model(shape)
    gated = GatedModel(model, offset_init=0.0)
    with torch.no_grad():
        gated.offsets.copy_(torch.linspace(-0.3, 0.3, gated.offsets.numel()).view_as(gated.offsets))
    gated.save(root / "gated", tokenizer)
    status = cli(["attribute", "-p", PROMPTS[0], "-p", PROMPTS[1], "--model", "tiny", "--clt", root / "clt",
                  "--store", root / "store", "--frontend", root / "frontend", "--unique-error-ids", *SETTINGS])
    assert status == 0
    return SimpleNamespace(root=root, clt=root / "clt", gated=root / "gated", store=root / "store")


def stored_tables(store, graph_id: str) -> dict[str, pd.DataFrame]:
    stored = store.load_graph(graph_id)
    return {"graphs": stored.info.to_frame().T, "nodes": stored.nodes, "edges": stored.edges,
            "head_loadings": stored.head_loadings, "qk_pairs": stored.qk_pairs}


def assert_same_graph(record, stored: dict[str, pd.DataFrame]) -> None:
    for table in TABLES:
        expected = record.tables[table].to_pandas()
        if table == "graphs":  # timings differ; the store adds row counts
            columns = [c for c in expected.columns if c not in ("seconds", "created") and not c.startswith("rows_")]
            expected = expected[columns]
            got = stored[table][columns].reset_index(drop=True).astype(expected.dtypes.to_dict())
        else:
            got = stored[table]
        assert len(expected) == len(got)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=table != "graphs")


def test_attribute_stores_what_the_attributor_computes(inputs):
    store = open_store(inputs.store)
    attributor = Attributor.load(ModelSpec(name="tiny"), inputs.clt, "dense")
    for index, prompt in enumerate(PROMPTS):
        record = attributor.record(PromptItem(prompt, "custom", index), CONFIG)
        assert store.has_graph("dense", record.graph_id)
        assert_same_graph(record, stored_tables(store, record.graph_id))
        front = json.loads((inputs.root / "frontend" / f"{record.graph_id}.json").read_text())
        assert front["metadata"]["prompt"] == prompt and front["metadata"]["node_threshold"] == 0.7
        logits = [node["clerp"] for node in front["nodes"] if node["feature_type"] == "logit"]
        tokens = record.tables["graphs"]["logit_tokens"][0].as_py()
        assert logits and all(c.startswith(f'Output "{attributor.tokenizer.decode([t])}"')
                              for c, t in zip(logits, tokens))
    saved = (inputs.store / "dense_attribution_config.yaml").read_text()
    assert AttributionStageConfig.model_validate(yaml.safe_load(saved)) == CONFIG.model_copy(
        update={"prompts": PROMPTS})


def test_attribute_a_gated_checkpoint_and_skip_stored_graphs(inputs, tmp_path, capsys):
    store_dir = tmp_path / "store"
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n\n" + json.dumps(PROMPTS[1]) + "\n")
    argv = ["attribute", "--prompts-file", prompts_file, "--gated-checkpoint", inputs.gated, "--clt", inputs.clt,
            "--store", store_dir, *SETTINGS]
    assert cli(argv) == 0
    attributor = Attributor.load(inputs.gated, inputs.clt, "sparse")
    record = attributor.record(PromptItem(PROMPTS[1], "custom", 1), CONFIG)
    assert_same_graph(record, stored_tables(open_store(store_dir), record.graph_id))
    capsys.readouterr()
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert out.count("stored graph") == 2 and record.graph_id in out
    assert len(open_store(store_dir).list_graphs("sparse")) == 2


def test_settings_come_from_a_pipeline_config_then_the_options(inputs, tmp_path):
    preset = Path(__file__).resolve().parents[1] / "pipeline" / "presets" / "tiny.yaml"
    assert cli(["attribute", "-p", PROMPTS[1], "--config", preset, "--qk-top-pairs", "3", "--no-attention",
                "--model", "tiny", "--clt", inputs.clt, "--store", tmp_path / "store", "--quiet"]) == 0
    saved = AttributionStageConfig.model_validate(yaml.safe_load(
        (tmp_path / "store" / "dense_attribution_config.yaml").read_text()))
    from_preset = yaml.safe_load(preset.read_text())["attribution"]
    assert saved.attention.max_attention_edges == from_preset["attention"]["max_attention_edges"] != 2000
    assert (saved.attention.qk_top_pairs, saved.attention.enabled) == (3, False)
    assert saved.prompts == [PROMPTS[1]] and saved.prompt_sets == {}
    stored = open_store(tmp_path / "store").load_graph(open_store(tmp_path / "store").list_graphs()["graph_id"][0])
    assert json.loads(stored.info["settings"]) == json.loads(settings_json(saved))
    assert len(stored.head_loadings) == 0 and len(stored.qk_pairs) == 0


def test_a_prompt_that_fails_is_recorded_and_exits_1(inputs, tmp_path, capsys):
    status = cli(["attribute", "-p", "", "-p", PROMPTS[0], "--model", "tiny", "--clt", inputs.clt,
                  "--store", tmp_path / "store", *SETTINGS])
    assert status == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: prompt '' could not be attributed: AttributionError")
    store = open_store(tmp_path / "store")
    assert len(store.failures("dense")) == 1 and len(store.list_graphs("dense")) == 1


def test_query_prints_the_stores_tables(inputs, capsys):
    store = open_store(inputs.store)
    graphs = store.list_graphs()
    assert cli(["query", "graphs", inputs.store, "--format", "csv"]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert printed["graph_id"].tolist() == graphs["graph_id"].tolist()
    assert printed["prompt"].tolist() == graphs["prompt"].tolist()
    assert printed["n_edges_kept"].tolist() == graphs["n_edges_kept"].tolist()

    graph_id = graphs["graph_id"].iloc[0]
    assert cli(["query", "edges", inputs.store, graph_id, "--top", "7"]) == 0
    expected = store.top_edges(graph_id, 7)[["source_id", "target_id", "weight", "kept"]]
    assert capsys.readouterr().out == expected.to_string(index=False, max_colwidth=60) + "\n"

    loadings = pd.concat([store.load_graph(g).head_loadings for g in graphs["graph_id"]])
    layer, head = loadings.loc[loadings["head"] >= 0, ["layer", "head"]].iloc[0]
    carried = loadings[(loadings["layer"] == layer) & (loadings["head"] == head)].groupby("graph_id").size()
    assert cli(["query", "head", inputs.store, f"L{layer}H{head}", "--format", "csv"]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index("graph_id")
    assert printed["edges"].sort_index().to_dict() == carried.sort_index().to_dict()
    n_heads = TinyModelConfig().n_heads
    assert cli(["query", "head", inputs.store, f"L0H{n_heads + 5}"]) == 0
    assert capsys.readouterr().out == "(no rows)\n"


def test_export_writes_the_frontend_json(inputs, tmp_path, capsys):
    store = open_store(inputs.store)
    tokenizer = Attributor.load(ModelSpec(name="tiny"), inputs.clt, "dense").tokenizer
    graph_id = store.list_graphs()["graph_id"].iloc[1]
    assert cli(["export", inputs.store, graph_id, "--out", tmp_path / "cli", "--slug", "cat", "--unique-error-ids"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "cat.json")
    direct = export_frontend(store, graph_id, tmp_path / "direct", "cat", tokenizer=tokenizer, unique_error_ids=True)
    assert (tmp_path / "cli" / "cat.json").read_text() == direct.read_text()
    assert "_-1_" in direct.read_text()  # error nodes under the store's ids

    status = cli(["export", inputs.store, "--all", "--out", tmp_path / "all"])  # circuit-tracer's error ids
    try:
        for graph_id in store.list_graphs()["graph_id"]:
            export_frontend(store, graph_id, tmp_path / "all-direct", tokenizer=tokenizer)
    except FrontendExportError as error:  # an error id collides with a layer-0 feature: refused, one line
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and str(error).split(";")[0] in err[0]
    else:
        assert status == 0
        index = json.loads((tmp_path / "all" / "graph-metadata.json").read_text())
        assert sorted(g["slug"] for g in index["graphs"]) == sorted(store.list_graphs()["graph_id"])
        for graph_id in store.list_graphs()["graph_id"]:
            assert ((tmp_path / "all" / f"{graph_id}.json").read_text()
                    == (tmp_path / "all-direct" / f"{graph_id}.json").read_text())


def test_run_is_the_pipeline(tmp_path, capsys):
    assert cli(["run", "--preset", "tiny", "--stages", "sparsify", "--executor", "local", "--quiet",
                "--set", "sparsify.train.steps=2", "--set", "sparsify.eval.long_blocks=0",
                "--output", tmp_path / "out"]) == 0
    assert (tmp_path / "out" / "sparsify" / "model" / "gate.safetensors").is_file()
    assert "pipeline finished" in capsys.readouterr().out


def test_serve_hands_the_store_to_the_viewer(inputs, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(sys.modules, "viewer", SimpleNamespace(serve=lambda *args: calls.append(args)))
    assert cli(["serve", inputs.store, "--host", "0.0.0.0", "--port", "8123"]) == 0
    assert calls == [(Path(inputs.store), "0.0.0.0", 8123)]
    monkeypatch.setitem(sys.modules, "viewer", None)  # as if the package were not installed
    assert cli(["serve", inputs.store]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no package `viewer`" in err[0]


def subcommand_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield path + (name,), sub
                yield from subcommand_parsers(sub, path + (name,))


def test_help_names_every_option_and_every_setting_is_an_option():
    found = dict(subcommand_parsers(build_parser()))
    assert {"run", "attribute", "query", "export", "serve"} <= {p[0] for p in found}
    for path, parser in found.items():
        text = parser.format_help()
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, f"{' '.join(path)} --help lacks {option}"
    fields = {("graph", f) for f in GraphConfig.model_fields} | {("attention", f) for f in
                                                                 AttentionAttributionConfig.model_fields}
    fields |= {(f,) for f in AttributionStageConfig.model_fields if f not in ("graph", "attention", "prompts",
                                                                             "prompt_sets")}
    assert {s.location for s in attribute.SETTINGS} == fields


BAD = [  # (arguments after `attribute ... --store S` or a whole command line, what the error line names, status)
    (["--max-n-logits", "-3"], "--max-n-logits: Input should be greater than 0 (got '-3')", 2),
    (["--node-threshold", "1.5"], "--node-threshold: Input should be less than or equal to 1 (got '1.5')", 2),
    (["--store-edges", "some"], "invalid choice: 'some'", 2),
    (["--threads", "two"], "--threads: Input should be a valid integer", 2),
    (["--bogus"], "unrecognized arguments: --bogus", 2),
]


@pytest.mark.parametrize("extra, message, status", BAD)
def test_bad_attribute_settings_are_one_line_naming_the_value(inputs, tmp_path, capsys, extra, message, status):
    argv = ["attribute", "-p", "x", "--model", "tiny", "--clt", inputs.clt, "--store", tmp_path / "s", *extra]
    assert cli(argv) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "s").exists()


def bad_commands(inputs, tmp: Path) -> list[tuple[list, str, int]]:
    model = ["--model", "tiny", "--clt", inputs.clt, "--store", tmp / "s"]
    (tmp / "bool.yaml").write_text("graph: {max_n_logits: true}\n")
    return [
        (["attribute", "-p", "x", "--model", "no-such-model", "--clt", inputs.clt, "--store", tmp / "s"],
         'unknown model "no-such-model"', 2),
        (["attribute", "-p", "x", "--model", "tiny", "--clt", tmp / "no-clt", "--store", tmp / "s"],
         f"--clt {tmp / 'no-clt'} is not a directory", 2),
        (["attribute", "-p", "x", "--gated-checkpoint", inputs.clt, "--clt", inputs.clt, "--store", tmp / "s"],
         f"--gated-checkpoint {inputs.clt} has no gate.safetensors", 2),
        (["attribute", "-p", "x", "--model", inputs.gated, "--clt", inputs.clt, "--store", tmp / "s"],
         f"--model {inputs.gated} is a gated checkpoint", 2),
        (["attribute", "--prompts-file", tmp / "none.txt", *model], f"--prompts-file {tmp / 'none.txt'} does not", 2),
        (["attribute", *model], "no prompts", 2),
        (["attribute", "-p", "x", "--variant", "a/b", *model], "--variant: variant 'a/b' must be", 2),
        (["attribute", "-p", "x", "-p", "y", "--slug", "s", "--frontend", tmp / "f", *model], "--slug 's' names one", 2),
        (["attribute", "-p", "x", "--config", tmp / "bool.yaml", *model], "attribution.graph.max_n_logits: expected a "
         "number, got a boolean", 2),
        (["query", "head", inputs.store, "Z9"], "head 'Z9' must look like L5H3", 2),
        (["query", "head", inputs.store, "L9H0"], "layer 9 is past the last layer (1)", 2),
        (["query", "edges", inputs.store, "0123456789abcdef"], "graph 0123456789abcdef is not in the store", 2),
        (["query", "edges", inputs.store, "a/b"], "graph id 'a/b' must be", 2),
        (["query", "edges", inputs.store, "0123456789abcdef", "--top", "0"], "--top 0 must be a positive count", 2),
        (["query", "graphs", tmp / "nowhere"], f"store {tmp / 'nowhere'} is not a directory", 2),
        (["query", "graphs", inputs.store, "--variant", "sprase"], "--variant 'sprase' is not in the store", 2),
        (["export", inputs.store, "--out", tmp / "o"], "give graph ids or --all", 2),
        (["serve", tmp / "nowhere"], f"store {tmp / 'nowhere'} is not a directory", 2),
        (["run", "--preset", "nope", "--output", tmp / "o"], "unknown preset 'nope'", 2),
        (["frobnicate"], "invalid choice: 'frobnicate'", 2),
    ]


def test_bad_values_are_one_line_errors_naming_them(inputs, tmp_path, capsys):
    for argv, message, status in bad_commands(inputs, tmp_path):
        assert cli(argv) == status, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
