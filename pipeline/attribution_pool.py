"""Batch attribution on several workers: the calling process (the stage's Ray task) and `num_workers - 1`
Ray actors. Each loads the model and CLT once (`Attributor.load`) and runs the stage's per-prompt step
(`Attributor.attribute`) on the prompts it is handed, writing each finished graph (or failure) into the
store itself, so a killed batch keeps everything finished.

A fresh actor spends seconds before its first prompt (process start, importing torch and transformers,
loading), so the calling process attributes from the start, and starts the actors only if, at the pace of
its first computed prompt, the rest of the batch would take it longer than that (ACTOR_START_SECONDS): a
short batch costs what `attribution.stage.run` costs. An actor gets prompts once it has loaded,
CALLS_PER_ACTOR at a time so it never waits on a round trip; actors still starting when the batch runs
out are killed, not waited for. The actors share one placement group (gang-scheduled) that nothing waits
for, so stages sharing a small cluster cannot deadlock.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from attribution import stage as attribution
from attribution.config import AttributionStageConfig
from attribution.store import GraphStore, check_variant, open_store
from pipeline.config import ConfigError, StageResources

CALLS_PER_ACTOR = 2  # prompts queued on an actor: its next one is there while this process collects one
# What a fresh actor takes before its first prompt (process start, torch and transformers imports, load):
# 3.5 s on 2 idle cores, about 5 s at load 6 (tiny preset). A batch that this process finishes sooner gains
# nothing from an actor, whose start only takes CPU from it.
ACTOR_START_SECONDS = 5.0


class AttributionWorker:
    """One actor of the pool: a loaded model and CLT, and the store it writes into."""

    def __init__(self, config: AttributionStageConfig, model_source, clt_dir: str, store_root: str, variant: str,
                 threads: int):

        torch.set_num_threads(config.threads or threads)
        self.config = config
        self.store = open_store(store_root)
        self.attributor = attribution.Attributor.load(model_source, clt_dir, variant)

    def ready(self) -> int:
        """Answers once the model and CLT are loaded."""
        return os.getpid()

    def attribute(self, item: attribution.PromptItem, force: bool) -> dict:
        return self.attributor.attribute(item, self.config, self.store, force)


def run_on_actors(config: AttributionStageConfig, model_source, clt_dir: Path, store_dir: Path, variant: str,
                  resources: StageResources, *, progress: bool = True, force: bool = False,
                  work_here: bool = True, replace: bool = False) -> dict:
    """`attribution.stage.run` over the config's batch on `resources.num_workers` workers: this process and
    `num_workers - 1` actors (`work_here=False`: `num_workers` actors and this process only hands out
    prompts). Same summary; `replace` as there."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    started = time.perf_counter()
    store = open_store(store_dir)
    todo = deque(attribution.batch_items(config, None))
    total = len(todo)
    removed = []
    if replace:  # before any actor writes: the variant never holds graphs of two CLTs
        keep = attribution.batch_graph_ids(config, list(todo), model_source, clt_dir, variant)
        removed = attribution.remove_other_graphs(store, check_variant(variant), keep)
    attribution.write_config(store, config, check_variant(variant))
    n_workers = min(resources.num_workers, total)
    n_actors = max(0, n_workers - 1) if work_here else n_workers
    memory = int(resources.memory_gb * 2**30) if resources.memory_gb else None
    bundle = {"CPU": resources.num_cpus, **({"GPU": resources.num_gpus} if resources.num_gpus else {}),
              **({"memory": memory} if memory else {})}
    cluster = ray.cluster_resources()
    for name, amount in bundle.items():
        if cluster.get(name, 0) < amount * n_workers:
            raise ConfigError(f"resources.stages.attribution asks for {n_workers} workers x {amount} {name}; the Ray "
                             f"cluster has {cluster.get(name, 0)}: lower num_workers or the per-worker resources")
    actors, groups = [], []

    def start_actors() -> list:
        groups.append(placement_group([bundle] * n_actors, strategy="PACK"))
        for index in range(n_actors):
            actors.append(ray.remote(AttributionWorker).options(
                num_cpus=resources.num_cpus, num_gpus=resources.num_gpus, memory=memory, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(groups[0], placement_group_bundle_index=index),
            ).remote(config, model_source, str(clt_dir), str(store.root), variant, max(1, int(resources.num_cpus))))
        return actors

    try:
        local = None
        if work_here:
            if config.threads:

                torch.set_num_threads(config.threads)
            local = attribution.Attributor.load(model_source, clt_dir, variant)
        outcomes = share_batch(todo, local, start_actors if n_actors else None, config, store, force)
        summary = attribution.summarize(outcomes, variant, store, total, progress=progress, started=started)
        return {**summary, "removed": removed}
    finally:
        for actor in actors:
            ray.kill(actor)
        for group in groups:
            remove_placement_group(group)  # its CPUs go back to the other stages at once


def share_batch(todo: deque, local: attribution.Attributor | None, start_actors: Callable[[], list] | None,
                config: AttributionStageConfig, store: GraphStore, force: bool) -> Iterator[dict]:
    """Outcomes of the prompts in `todo` in the order they finish. `local` (if any) attributes one prompt
    here whenever no finished remote call is waiting; each actor, once ready, holds up to CALLS_PER_ACTOR
    prompts. Actors start at once without `local`, else only if, at the pace of the first prompt computed
    here, the rest of the batch would take longer than ACTOR_START_SECONDS."""
    import ray

    starting = {}  # ready call -> actor
    if start_actors is not None and local is None:
        starting = {actor.ready.remote(): actor for actor in start_actors()}
    decided = local is None  # whether actors were started or ruled out
    running = {}  # attribute call -> actor
    free = []  # one entry per call an actor can take now
    while todo or running:
        waiting = list(running) + (list(starting) if todo else [])
        if not waiting:
            done = []
        elif todo and local is not None:  # collect what is done without waiting: this process has work
            done = ray.wait(waiting, num_returns=len(waiting), timeout=0)[0]
        else:
            done = ray.wait(waiting, num_returns=1)[0]
        for ref in done:
            if ref in starting:
                ray.get(ref)  # an actor that failed to load raises here
                free += [starting.pop(ref)] * CALLS_PER_ACTOR
            else:
                free.append(running.pop(ref))
                yield ray.get(ref)
        while free and todo:
            actor = free.pop()
            running[actor.attribute.remote(todo.popleft(), force)] = actor
        if todo and local is not None:
            prompt_started = time.perf_counter()
            outcome = local.attribute(todo.popleft(), config, store, force)
            if not decided and outcome["status"] != "skipped":  # a computed prompt: its pace tells
                decided, seconds_left = True, len(todo) * (time.perf_counter() - prompt_started)
                if start_actors is not None and seconds_left > ACTOR_START_SECONDS:
                    starting = {actor.ready.remote(): actor for actor in start_actors()}
            yield outcome
