"""The attribution stage as one plain function: graphs for a list of prompts, into the Parquet store.

Per prompt (`Attributor.attribute`, the one place of the per-prompt logic): freeze the model on it,
build the local replacement model with the CLT, compute the graph, prune it, split its kept edges over
heads, QK-attribute the attention edges that carry them, and write everything to the store under one
graph_id. A prompt that cannot be attributed (too long, empty, bad tokens, over the memory budget: an
AttributionError; or any other error while attributing or writing it) is recorded in the store's
`failures` table with the error's type and message, and the batch goes on. A prompt whose graph or failure is already stored is skipped
(unless forced), so a killed batch resumes where it stopped. Graph ids come from contents only (the model's
and the CLT's files, the prompt, the settings), and a replacing run (`replace`, as in the pipeline) first
deletes the variant's graphs of other ids, so a changed CLT never leaves stale graphs beside new ones. `run` loops over the batch in-process;
the pipeline can instead spread the same per-prompt calls over a pool of Ray actors.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm import tqdm

from attribution.budget import budget_bytes, check_fits, frozen_prompt_bytes, graph_bytes, tensor_bytes
from attribution.config import AttributionStageConfig
from attribution.graph import AttributionGraph, attribute
from attribution.heads import edges_to_load, head_loadings
from attribution.nodes import TranscoderWeights, build_replacement, transcoder_weights
from attribution.prune import PruneResult, prune
from attribution.qk import qk_attribution
from attribution.records import (
    GraphRecord,
    edges_table,
    failure_table,
    from_frame,
    graphs_table,
    make_graph_id,
    nodes_table,
    storable_text,
)
from attribution.replacement import (
    ModelWeights,
    check_prompt_length,
    extract_weights,
    freeze_prompt,
    tokenize_prompt,
)
from attribution.store import GraphStore, check_variant, open_store
from prompts.tasks import PROMPT_DIR, load_task
from runtime.precision import autocast, check_precision
from sparse_attention.sources import ModelSource, load_source, source_identity
from transcoders.clt import clt_content_id, load_clt

__all__ = ["AttributionStageConfig", "ModelSource", "PromptItem", "prompt_items", "run", "Attributor",
           "batch_graph_ids", "batch_items", "remove_other_graphs", "summarize", "write_config"]

CONFIG_FILE = "attribution_config.yaml"
SUMMARY_KEYS = ("graph_id", "prompt", "task", "prompt_index", "n_pos", "n_active_features", "n_nodes", "n_nodes_kept",
                "n_edges_kept", "replacement_score", "completeness_score", "seconds")


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a batch: its text, its prompt set ("custom" for free prompts) and its index there."""

    prompt: str
    task: str = "custom"
    index: int = 0


def prompt_items(config: AttributionStageConfig, prompt_dir: Path | None = None) -> list[PromptItem]:
    """The batch the config names: each prompt set's first n clean prompts, then the free prompts."""

    items = []
    for task, count in config.prompt_sets.items():
        prompts = load_task(task, prompt_dir or PROMPT_DIR)
        if len(prompts) < count:
            raise ValueError(f"prompt_sets.{task} asks for {count} prompts; the set has {len(prompts)}")
        items += [PromptItem(p.clean, task, i) for i, p in enumerate(prompts[:count])]
    return items + [PromptItem(prompt, "custom", i) for i, prompt in enumerate(config.prompts)]


@dataclass
class Attributor:
    """A loaded model and CLT, ready to turn prompts into graph records."""

    model: nn.Module
    tokenizer: object
    weights: ModelWeights
    clt: TranscoderWeights
    model_id: str  # the model's content identity (canonical JSON)
    clt_id: str  # the sha256 of the CLT's weight files
    clt_dir: str  # where the CLT was read from: recorded with each graph (for its labels), not part of its id
    variant: str

    @classmethod
    def load(cls, model_source: ModelSource, clt_dir: str | Path, variant: str) -> Attributor:
        model, tokenizer, identity = load_source(model_source)
        weights = extract_weights(model)
        clt_dir = Path(clt_dir).resolve()
        clt = transcoder_weights(load_clt(clt_dir), weights)
        return cls(model, tokenizer, weights, clt, json.dumps(identity, sort_keys=True), clt_content_id(clt_dir),
                   str(clt_dir), check_variant(variant))

    def graph_id(self, prompt: str, config: AttributionStageConfig) -> str:
        """The prompt's graph id: from the variant, the model's and the CLT's contents, the prompt and the
        settings only (no path, no file time), so a copied model or CLT gives the same ids."""
        return make_graph_id(self.variant, self.model_id, self.clt_id, prompt, settings_json(config))

    def clt_record(self) -> str:
        """The graphs table's `clt` column: the CLT's content hash and the directory it was read from."""
        return json.dumps({"sha256": self.clt_id, "dir": self.clt_dir})

    def record(self, prompt: str | PromptItem, config: AttributionStageConfig) -> GraphRecord:
        """Compute and package the graph of one prompt (raises AttributionError for a bad prompt, its
        MemoryBudgetError when it cannot fit `config.memory_budget_gb`)."""
        item = prompt if isinstance(prompt, PromptItem) else PromptItem(prompt)
        prompt = item.prompt
        started = time.perf_counter()
        budget = budget_bytes(config.memory_budget_gb)
        tokens = tokenize_prompt(self.tokenizer, prompt)
        n_pos = len(tokens)
        check_prompt_length(n_pos, self.weights.n_ctx)
        check_fits(f"freezing a {n_pos}-token prompt", frozen_prompt_bytes(self.weights, n_pos, self.clt.n_features),
                   budget)
        with autocast(config.precision, "cpu"):
            frozen = freeze_prompt(self.model, tokens)
        lrm = build_replacement(self.weights, self.clt, frozen, config.graph.max_n_logits,
                                config.graph.desired_logit_prob)
        check_fits(f"the graph of {lrm.n_active} active features over {n_pos} positions",
                   tensor_bytes(frozen, lrm) + graph_bytes(self.weights, n_pos, lrm.n_active, len(lrm.logit_tokens),
                                                           config.graph), budget)
        graph = attribute(lrm, config.graph, prompt=prompt)
        pruned = prune(graph.rows, graph.logit_probs, graph.n_selected, graph.n_pos,
                       config.graph.node_threshold, config.graph.edge_threshold, row_nodes=graph.row_nodes)
        loadings = qk = None
        if config.attention.enabled:
            targets, sources = edges_to_load(graph, *kept_edges(graph, pruned), config.attention.edge_influence_share)
            spare = budget - tensor_bytes(frozen, lrm, graph, pruned)  # what the graph leaves
            loadings = head_loadings(lrm, graph, targets, sources, config.attention, memory_budget=spare)
            qk = qk_attribution(lrm, loadings, config.attention, memory_budget=spare)
        graph_id = self.graph_id(prompt, config)
        token_strings = [self.tokenizer.decode([t]) for t in tokens]
        return GraphRecord(graph_id, self.variant, {
            "graphs": graphs_table(graph_id, self.variant, graph, pruned, token_strings=token_strings,
                                   model=self.model_id, clt=self.clt_record(), settings=settings_json(config),
                                   edges_stored=config.store_edges, seconds=time.perf_counter() - started,
                                   task=item.task, prompt_index=item.index),
            "nodes": nodes_table(graph_id, graph, pruned),
            "edges": edges_table(graph_id, graph, pruned, config.store_edges),
            "head_loadings": from_frame("head_loadings", graph_id, loadings),
            "qk_pairs": from_frame("qk_pairs", graph_id, qk),
        })

    def attribute(self, item: PromptItem, config: AttributionStageConfig, store: GraphStore,
                  force: bool = False) -> dict:
        """One prompt of a batch, end to end: skip it if its graph or failure is stored (unless `force`),
        else compute and write its graph, or record why it cannot be attributed. Returns the outcome:
        `status` "graph" (with the graph's summary), "failed" (with the error) or "skipped"."""
        graph_id = self.graph_id(item.prompt, config)
        outcome = {"graph_id": graph_id, "worker": os.getpid()}
        if not force:
            if store.has_graph(self.variant, graph_id):
                return {**outcome, "status": "skipped", "stored": "graph"}
            if store.has_failure(self.variant, graph_id):
                return {**outcome, "status": "skipped", "stored": "failure"}
        try:
            record = self.record(item, config)
            store.write(record)
        except Exception as error:  # noqa: BLE001 - any error of this prompt is recorded, the batch goes on
            store.delete(graph_id, missing_ok=True)  # forced rerun: an old graph must not contradict it
            store.write_failure(self.variant, graph_id, failure_table(graph_id, self.variant, item.prompt, item.task,
                                                                      item.index, error))
            return {**outcome, "status": "failed", "prompt": storable_text(item.prompt), "task": item.task,
                    "index": item.index, "error_type": type(error).__name__, "error": storable_text(str(error))}
        if force:
            store.delete_failure(self.variant, graph_id)
        info = record.tables["graphs"].to_pylist()[0]
        return {**outcome, "status": "graph", **{key: info[key] for key in SUMMARY_KEYS}}


# settings added after graphs were stored, whose value here computes them exactly as before they existed: left out
# of the settings (and so of graph ids) at that value, so those graphs are still found
LATER_SETTINGS_AT_OLD_BEHAVIOUR = {("attention", "edge_influence_share"): 1.0}


def settings_json(config: AttributionStageConfig) -> str:
    """The settings that change a graph (not the prompt list or threads), as canonical JSON."""
    settings = config.model_dump(mode="json", exclude={"prompts", "prompt_sets", "threads", "memory_budget_gb"})
    for (section, option), old_behaviour in LATER_SETTINGS_AT_OLD_BEHAVIOUR.items():
        if settings[section][option] == old_behaviour:
            del settings[section][option]
    return json.dumps(settings, sort_keys=True)


def kept_edges(graph: AttributionGraph, pruned: PruneResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets, sources, influence) of the nonzero edges pruning keeps, each edge's influence on the
    logits as pruning scored it.  -> three [E] tensors"""
    if not torch.equal(pruned.row_nodes, graph.row_nodes):
        raise ValueError("the pruning result is not of this graph's rows")
    row, source = pruned.edge_mask.nonzero().unbind(1)
    nonzero = graph.rows[row, source] != 0
    return graph.row_nodes[row[nonzero]], source[nonzero], pruned.kept_edge_influence[nonzero]


def write_config(store: GraphStore, config: AttributionStageConfig, variant: str) -> None:
    """Save the stage config beside the store's tables, one file per variant."""
    store.fs.create_dir(store.root, recursive=True)
    with store.fs.open_output_stream(f"{store.root}/{check_variant(variant)}_{CONFIG_FILE}") as out:
        out.write(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())


def batch_items(config: AttributionStageConfig, prompts: list[str | PromptItem] | None) -> list[PromptItem]:
    """The prompts to attribute: `prompts` (plain strings become custom prompts), or the config's batch."""
    if prompts is None:
        return prompt_items(config)
    return [p if isinstance(p, PromptItem) else PromptItem(p, "custom", i) for i, p in enumerate(prompts)]


def summarize(outcomes: Iterable[dict], variant: str, store: GraphStore, total: int, *, progress: bool,
              started: float) -> dict:
    """Collect per-prompt outcomes (in the order they finish) into the stage summary, with a progress bar."""
    summary = {"variant": variant, "store": str(store.root), "graphs": [], "failures": [], "skipped": [],
               "first_result_seconds": None}
    workers = set()
    with tqdm(total=total, desc=f"attribution {variant}", disable=not progress, dynamic_ncols=True) as bar:
        for outcome in outcomes:
            if summary["first_result_seconds"] is None:  # start-up cost: loading, actors starting
                summary["first_result_seconds"] = time.perf_counter() - started
            status = outcome.pop("status")
            workers.add(outcome.pop("worker"))
            if status == "skipped":
                summary["skipped"].append(outcome["graph_id"])
            else:
                summary["graphs" if status == "graph" else "failures"].append(outcome)
            bar.update(1)
    summary["workers"], summary["worker_pids"] = len(workers), sorted(workers)
    summary["failures_in_store"] = len(store.failures(variant))
    summary["seconds"] = time.perf_counter() - started
    return summary


def batch_graph_ids(config: AttributionStageConfig, items: list[PromptItem], model_source: ModelSource,
                    clt_dir: str | Path, variant: str) -> set[str]:
    """The graph ids of a batch, from the model's and the CLT's contents, without loading either
    (the ids `Attributor.graph_id` gives)."""
    model_id, clt_id = json.dumps(source_identity(model_source), sort_keys=True), clt_content_id(clt_dir)
    settings = settings_json(config)
    return {make_graph_id(check_variant(variant), model_id, clt_id, item.prompt, settings) for item in items}


def remove_other_graphs(store: GraphStore, variant: str, keep: set[str]) -> list[str]:
    """Delete the variant's graphs and recorded failures whose ids are not in `keep` (those of an older model,
    CLT or settings, or of prompts no longer in the batch); returns the deleted ids, sorted."""
    graphs = set(store.list_graphs(variant)["graph_id"]) - keep
    failures = set(store.failures(variant)["failure_id"]) - keep
    for graph_id in sorted(graphs):
        store.delete(graph_id, missing_ok=True)
    for failure_id in sorted(failures):
        store.delete_failure(variant, failure_id)
    return sorted(graphs | failures)


def run(config: AttributionStageConfig, model_source: ModelSource, clt_dir: str | Path,
        prompts: list[str | PromptItem] | None, output_store: str | Path | GraphStore, variant: str, *,
        progress: bool = True, force: bool = False, replace: bool = False) -> dict:
    """Attribute `prompts` (None: the config's prompt sets and free prompts) on one model variant ("dense",
    "sparse", ...) into the store at `output_store`, in this process.

    `replace`: the variant is to hold this batch alone. Graphs and failures of other ids (another model, CLT
    or settings) are deleted before the first new graph is written, so the variant never holds two graphs of
    one prompt; the pipeline's attribution stage replaces.

    Returns a summary: per new graph its id, size and scores; per newly failed prompt the error (also in
    the store's failures table); the ids skipped because the store held their graph or failure (unless
    `force`); `removed`, the ids `replace` deleted; `workers` and `worker_pids` (the processes that
    attributed: here this one).
    """
    check_precision(config.precision, "cpu")
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    store = output_store if isinstance(output_store, GraphStore) else open_store(output_store)
    items = batch_items(config, prompts)
    attributor = Attributor.load(model_source, clt_dir, variant)
    keep = {attributor.graph_id(item.prompt, config) for item in items}
    removed = remove_other_graphs(store, attributor.variant, keep) if replace else []
    write_config(store, config, attributor.variant)
    outcomes = (attributor.attribute(item, config, store, force) for item in items)
    summary = summarize(outcomes, attributor.variant, store, len(items), progress=progress, started=started)
    return {**summary, "removed": removed}
