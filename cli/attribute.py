"""Attribution graphs of one or more prompts, written to a store (and, with --frontend, as circuit-tracer
frontend JSON).

The model is the dense original by any name the loader accepts (`smollm2-135m`, `tiny`, a Hugging Face
hub id, a local model directory) or, with --gated-checkpoint, a gated checkpoint directory (the sparsify
stage's model/). Graph settings are the attribution config's fields: from --config (a YAML file of those
fields, or a pipeline config whose `attribution` section is used), then from the options below, which win.
A graph already in the store (same prompt, model, CLT and settings) is not recomputed unless --force.
A prompt that cannot be attributed is recorded in the store's failures table; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin

import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ValidationError

from attribution.config import AttentionAttributionConfig, AttributionStageConfig, GraphConfig
from attribution.stage import Attributor, PromptItem, batch_items, summarize, write_config
from attribution.store import StoreError, check_variant, open_store
from cli.errors import UsageError, one_line, validation_message
from cli.query import add_frontend_options, write_frontend
from pipeline.config import parse_config
from sparse_attention.config import ModelSpec
from sparse_attention.gated_attention import GATE_FILE
from sparse_attention.sources import ModelSource


@dataclass(frozen=True)
class Setting:
    """One attribution config field set by an option."""

    location: tuple[str, ...]  # e.g. ("graph", "max_n_logits")
    option: str  # e.g. "--max-n-logits"

    @property
    def dest(self) -> str:
        return "setting." + ".".join(self.location)


def _settings() -> list[Setting]:
    """Every field of GraphConfig and AttentionAttributionConfig, and the stage's own graph settings."""
    found = [Setting(("graph", name), "--" + name.replace("_", "-")) for name in GraphConfig.model_fields]
    for name in AttentionAttributionConfig.model_fields:
        found.append(Setting(("attention", name), "--attention" if name == "enabled" else "--" + name.replace("_", "-")))
    return found + [Setting((name,), "--" + name.replace("_", "-")) for name in ("store_edges", "threads",
                                                                                 "memory_budget_gb", "precision")]


SETTINGS = _settings()
SECTIONS: dict[str, type[BaseModel]] = {"graph": GraphConfig, "attention": AttentionAttributionConfig}


def _field(location: tuple[str, ...]):
    model = SECTIONS[location[0]] if len(location) == 2 else AttributionStageConfig
    return model.model_fields[location[-1]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    prompts = parser.add_argument_group("prompts (at least one, unless --config names prompts or prompt_sets)")
    prompts.add_argument("-p", "--prompt", action="append", default=[], help="a prompt; repeat for more")
    prompts.add_argument("--prompts-file", type=Path, action="append", default=[], metavar="FILE",
                         help="prompts from a file: one per line, or in a .jsonl file one JSON string or object "
                         "with a `prompt` (or a task file's `clean`) per line; repeatable")
    model = parser.add_argument_group("model and CLT").add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="the dense model: smollm2-135m, tiny, a Hugging Face hub id or a local "
                       "model directory")
    model.add_argument("--gated-checkpoint", type=Path, metavar="DIR",
                       help="a gated checkpoint directory (the sparsify stage's model/)")
    parser.add_argument("--clt", type=Path, required=True, metavar="DIR", help="the CLT directory")
    parser.add_argument("--variant", help="the store's variant for these graphs (default: dense for --model, "
                        "sparse for --gated-checkpoint)")
    output = parser.add_argument_group("output")
    output.add_argument("--store", required=True, help="store directory or pyarrow filesystem URI")
    output.add_argument("--frontend", type=Path, metavar="DIR",
                        help="also write each graph as circuit-tracer frontend JSON into DIR")
    output.add_argument("--slug", help="the frontend graph's name (one prompt only; default its graph id)")
    add_frontend_options(output)
    output.add_argument("--force", action="store_true", help="recompute graphs (and failures) already stored")
    output.add_argument("--quiet", action="store_true", help="no progress bar")
    output.add_argument("--traceback", action="store_true", help="print the traceback of an error, too")
    graph = parser.add_argument_group("graph settings (default: circuit-tracer's, or --config's)")
    graph.add_argument("--config", type=Path, metavar="YAML", help="attribution config fields, or a pipeline "
                       "config (its attribution section)")
    for setting in SETTINGS:
        field = _field(setting.location)
        about = field.description or (AttentionAttributionConfig.__doc__ if setting.option == "--attention" else "")
        text = f"{about} ({'.'.join(setting.location)}, default {field.default})".replace("%", "%%")
        if field.annotation is bool:
            graph.add_argument(setting.option, dest=setting.dest, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
        elif get_origin(field.annotation) is Literal:
            graph.add_argument(setting.option, dest=setting.dest, choices=get_args(field.annotation), help=text)
        else:
            graph.add_argument(setting.option, dest=setting.dest, metavar="VALUE", help=text)


def read_prompts(path: Path) -> list[str]:
    """The prompts of a --prompts-file (see its help)."""
    if not path.is_file():
        raise UsageError(f"--prompts-file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--prompts-file {path} cannot be read as UTF-8 text ({error})") from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{number} is not JSON ({error})") from None
        if isinstance(value, dict):
            value = value.get("prompt", value.get("clean"))
        if not isinstance(value, str):
            raise UsageError(f"{path}:{number} holds no prompt: expected a JSON string or an object with a "
                             "string `prompt` or `clean`")
        prompts.append(value)
    return prompts


def load_settings(args: argparse.Namespace) -> tuple[AttributionStageConfig, bool]:
    """The attribution config (--config, then the options), and whether it names the prompts to attribute
    (the file has `prompts` or `prompt_sets`)."""
    raw: dict = {}
    if args.config is not None:
        if not args.config.is_file():
            raise UsageError(f"--config {args.config} does not exist")
        try:
            loaded = yaml.safe_load(args.config.read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise UsageError(f"--config {args.config} is not a readable YAML file ({error})") from None
        if not isinstance(loaded, dict):
            raise UsageError(f"--config {args.config} must hold a mapping of config fields")
        section = loaded.get("attribution", {}) if "attribution" in loaded else loaded
        if not isinstance(section, dict):
            raise UsageError(f"--config {args.config}: its attribution section must be a mapping")
        names_prompts = "prompts" in section or "prompt_sets" in section
        # validated as a pipeline config: messages name the field, and true/false is not taken as a number
        raw = parse_config({"attribution": section}, str(args.config)).attribution.model_dump(mode="json")
    else:
        names_prompts = False
    given = {}
    for setting in SETTINGS:
        value = getattr(args, setting.dest)
        if value is None:
            continue
        if isinstance(value, str) and value.lower() == "none":
            value = None
        *sections, leaf = setting.location
        node = raw
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
        given[setting.location] = setting.option
    try:
        return AttributionStageConfig.model_validate(raw), names_prompts
    except ValidationError as error:
        raise UsageError(validation_message(error, given)) from None


def model_source(args: argparse.Namespace) -> tuple[ModelSource, str]:
    """(what load_source loads, the variant) from --model / --gated-checkpoint / --variant."""
    if args.variant is not None:
        try:
            check_variant(args.variant)
        except StoreError as error:
            raise UsageError(f"--variant: {error}") from None
    if args.gated_checkpoint is not None:
        directory = args.gated_checkpoint
        if not (directory / GATE_FILE).is_file():
            raise UsageError(f"--gated-checkpoint {directory} has no {GATE_FILE}: not a gated checkpoint "
                             "(give the sparsify stage's model/ directory; a dense model goes to --model)")
        return directory.resolve(), args.variant or "sparse"
    name = args.model
    path = Path(name).expanduser()
    if path.exists():
        if (path / GATE_FILE).is_file():
            raise UsageError(f"--model {name} is a gated checkpoint; pass it as --gated-checkpoint (as --model "
                             "its gates would be left out)")
        name = str(path.resolve())  # the same directory gives the same graph ids from any working directory
    return ModelSpec(name=name), args.variant or "dense"


def prompt_batch(args: argparse.Namespace, config: AttributionStageConfig, config_names_prompts: bool
                 ) -> tuple[AttributionStageConfig, list[PromptItem]]:
    """The prompts to attribute (options first, else the config's batch) and the config saved with them."""
    prompts = list(args.prompt)
    for path in args.prompts_file:
        prompts += read_prompts(path)
    if prompts:
        config = config.model_copy(update={"prompts": prompts, "prompt_sets": {}})
        return config, batch_items(config, prompts)
    if config_names_prompts:
        return config, batch_items(config, None)
    raise UsageError("no prompts: give -p/--prompt, --prompts-file, or a --config with prompts or prompt_sets")


def execute(args: argparse.Namespace) -> int:
    config, names_prompts = load_settings(args)
    config, items = prompt_batch(args, config, names_prompts)
    if args.slug is not None and len(items) != 1:
        raise UsageError(f"--slug {args.slug!r} names one graph, but {len(items)} prompts were given")
    if args.slug is not None and args.frontend is None:
        raise UsageError("--slug names the frontend graph: give --frontend DIR too")
    if not args.clt.is_dir():
        raise UsageError(f"--clt {args.clt} is not a directory")
    source, variant = model_source(args)

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    store = open_store(args.store)
    attributor = Attributor.load(source, args.clt, variant)
    write_config(store, config, attributor.variant)
    outcomes = []

    def attributed():
        for item in items:
            outcome = attributor.attribute(item, config, store, args.force)
            outcomes.append(dict(outcome))
            yield outcome

    summarize(attributed(), attributor.variant, store, len(items), progress=not args.quiet, started=started)
    print(outcome_table(store, attributor.variant, items, outcomes).to_string(index=False))
    print(f"store: {store.root} (variant {attributor.variant})")
    failed = [(item, o) for item, o in zip(items, outcomes) if o["status"] == "failed" or o.get("stored") == "failure"]
    if args.frontend is not None:
        for outcome in outcomes:
            if outcome["graph_id"] not in {o["graph_id"] for _, o in failed}:
                path = write_frontend(store, outcome["graph_id"], args.frontend, args.slug, args.scan,
                                      attributor.tokenizer, args.unique_error_ids)
                print(f"frontend: {path}")
    for item, outcome in failed:
        detail = (f"{outcome['error_type']}: {one_line(outcome['error'])}" if outcome["status"] == "failed" else
                  "failed before (in the store's failures table; --force retries it)")
        print(f"error: prompt {_short(item.prompt)!r} could not be attributed: {detail}", file=sys.stderr)
    return 1 if failed else 0


def outcome_table(store, variant: str, items: list[PromptItem], outcomes: list[dict]) -> pd.DataFrame:
    """One row per prompt, in order: its graph id, what happened, and the graph's size and scores."""
    graphs = store.list_graphs(variant).set_index("graph_id")
    rows = []
    for item, outcome in zip(items, outcomes):
        status = {"graph": "new", "failed": "failed"}.get(outcome["status"], f"stored {outcome.get('stored')}")
        row = {"graph_id": outcome["graph_id"], "status": status, "nodes_kept": "-", "edges_kept": "-",
               "replacement": "-", "completeness": "-"}
        if outcome["graph_id"] in graphs.index:
            info = graphs.loc[outcome["graph_id"]]
            row |= {"nodes_kept": int(info["n_nodes_kept"]), "edges_kept": int(info["n_edges_kept"]),
                    "replacement": round(float(info["replacement_score"]), 4),
                    "completeness": round(float(info["completeness_score"]), 4)}
        rows.append(row | {"prompt": _short(item.prompt)})
    return pd.DataFrame(rows)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
