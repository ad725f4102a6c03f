"""Batch attribution on a pool of Ray actors: each loads the model and CLT once (`Attributor.load`),
then runs the stage's per-prompt step (`Attributor.attribute`) on the prompts it is handed, writing each
finished graph (or failure) into the store itself, so a killed batch keeps everything finished.

The actors of one pool are gang-scheduled (one placement group): two stages that each wait for half of
their actors while holding the other half would otherwise deadlock on a small cluster."""

from __future__ import annotations

import time
from pathlib import Path

from attribution import stage as attribution
from attribution.config import AttributionStageConfig
from attribution.store import check_variant, open_store
from pipeline.config import ConfigError, StageResources


class AttributionWorker:
    """One actor of the pool: a loaded model and CLT, and the store it writes into."""

    def __init__(self, config: AttributionStageConfig, model_source, clt_dir: str, store_root: str, variant: str,
                 threads: int):
        import torch

        torch.set_num_threads(config.threads or threads)
        self.config = config
        self.store = open_store(store_root)
        self.attributor = attribution.Attributor.load(model_source, clt_dir, variant)

    def attribute(self, item: attribution.PromptItem, force: bool) -> dict:
        return self.attributor.attribute(item, self.config, self.store, force)


def run_on_actors(config: AttributionStageConfig, model_source, clt_dir: Path, store_dir: Path, variant: str,
                  resources: StageResources, *, progress: bool = True, force: bool = False) -> dict:
    """`attribution.stage.run` over the config's batch, spread over `resources.num_workers` actors; same summary."""
    import ray
    from ray.util import ActorPool
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    started = time.perf_counter()
    store = open_store(store_dir)
    items = attribution.batch_items(config, None)
    attribution.write_config(store, config, check_variant(variant))
    n_workers = min(resources.num_workers, len(items))
    memory = int(resources.memory_gb * 2**30) if resources.memory_gb else None
    bundle = {"CPU": resources.num_cpus, **({"GPU": resources.num_gpus} if resources.num_gpus else {}),
              **({"memory": memory} if memory else {})}
    total = ray.cluster_resources()
    for name, amount in bundle.items():
        if total.get(name, 0) < amount * n_workers:
            raise ConfigError(f"resources.stages.attribution asks for {n_workers} workers x {amount} {name}; the Ray "
                             f"cluster has {total.get(name, 0)}: lower num_workers or the per-worker resources")
    group = placement_group([bundle] * n_workers, strategy="PACK")
    workers = []
    try:
        ray.get(group.ready())  # all of this pool's actors at once, or none yet
        for index in range(n_workers):
            workers.append(ray.remote(AttributionWorker).options(
                num_cpus=resources.num_cpus, num_gpus=resources.num_gpus,
                memory=memory, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
            ).remote(config, model_source, str(clt_dir), str(store.root), variant, max(1, int(resources.num_cpus))))
        pool = ActorPool(workers)
        outcomes = pool.map_unordered(lambda worker, item: worker.attribute.remote(item, force), items)
        return attribution.summarize(outcomes, variant, store, len(items), progress=progress, started=started)
    finally:
        for worker in workers:
            ray.kill(worker)
        remove_placement_group(group)  # its CPUs go back to the other stages at once
