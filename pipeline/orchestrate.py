"""Run the requested stages as a Ray DAG (embedded Ray, or a cluster via RAY_ADDRESS / `ray job submit`),
or in-process with `executor="local"`. Outputs go through the artifact store; finished stages are skipped
once their files check out against their manifest. The driver locks the output of every stage it will
compute before any starts (pipeline/locks.py); a run that computes nothing takes no lock and writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from pathlib import Path

import torch

from pipeline.artifacts import ArtifactError, ArtifactStore, artifact_key
from pipeline.config import ConfigError, PipelineConfig
from pipeline.locks import OutputLocks
from pipeline.stages import GROUPS, STAGES, Stage, stages_for

log = logging.getLogger("pipeline")
REPO_ROOT = Path(__file__).resolve().parent.parent


class StageError(RuntimeError):
    """A stage that raised or was killed; the message names the stage and the cause."""


def describe_error(error: BaseException) -> str:
    """`Type: message` on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def stage_keys(config: PipelineConfig) -> dict[str, str]:
    """Every stage's artifact key, derived from the config chain alone (no stage needs to run first)."""
    keys: dict[str, str] = {}
    for stage in STAGES.values():  # STAGES is in dependency order
        keys[stage.name] = artifact_key(stage.name, stage.key_payload(config),
                                        {name: keys[name] for name in stage.inputs})
    return keys


def is_finished(store: ArtifactStore, stage: Stage, key: str, *, force: bool = False, verify: bool = True) -> bool:
    """True if the stage's output exists for `key` (and, with `verify`, its files match its manifest); an
    output of another key, or one whose files changed after it finished, is an ArtifactError."""
    if not store.is_done(stage.manifest_dir, key, force=force):
        return False
    damaged = store.damaged_files(stage.manifest_dir) if verify else []
    if damaged:
        raise ArtifactError(
            f"stage {stage.name}: {len(damaged)} of its files changed after it finished: {', '.join(damaged)}; "
            f"recompute it with --force {stage.group} (and {stage.group} in --stages)")
    return True


def stage_files(store: ArtifactStore, stage: Stage) -> list[str]:
    """The files a finished stage leaves in the store (relative to its root), for its manifest: its directory
    without the outputs of stages nested in it, and, where stages share a directory, its own files alone."""
    nested = {directory.removeprefix(f"{stage.directory}/") for other in STAGES.values()
              for directory in (other.directory, other.manifest_dir) if directory.startswith(f"{stage.directory}/")}
    return store.output_files(stage.directory, skip=sorted(nested), only=stage.owns)


def execute_stage(stage_name: str, config_json: dict, root: str, keys: dict[str, str], force: bool,
                  progress: bool, *_dependencies, may_run: bool = True) -> dict:
    """Compute one stage unless its output exists; returns its manifest summary. Runs in a Ray task or inline.

    `may_run=False`: the driver found the stage finished and took no lock; computing it is then an error."""
    stage = STAGES[stage_name]
    if not logging.getLogger().handlers:  # a Ray worker: its stderr reaches the driver, INFO included
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config = PipelineConfig.model_validate(config_json)
    threads = config.resources.for_stage(stage.group).num_cpus
    if threads:

        torch.set_num_threads(int(threads))  # reused Ray workers keep their first thread count otherwise
    store = ArtifactStore(root)
    if is_finished(store, stage, keys[stage.name], force=force):
        log.info("%s: done already (%s), skipped", stage.name, store.uri(stage.directory))
        manifest = store.manifest(stage.manifest_dir) or {}
        return {"stage": stage.name, "skipped": True, **{k: v for k, v in manifest.items() if k != "files"}}
    if not may_run:
        raise ArtifactError(f"stage {stage.name}: its finished output in {root} went away after this run checked it "
                            "(another run forced it?); rerun")
    inputs = {name: store.work_dir(STAGES[name].directory) for name in stage.inputs}
    for name in inputs:
        if store.manifest(STAGES[name].manifest_dir) is None:
            raise ConfigError(f"stage {stage.name} needs {name}, which has no finished output in {root}")
    log.info("%s: start -> %s", stage.name, store.uri(stage.directory))
    started = time.perf_counter()
    summary = stage.run(config, store.work_dir(stage.directory), inputs, progress, force)
    seconds = time.perf_counter() - started
    store.commit(stage.directory, keys[stage.name], {"stage": stage.name, "seconds": seconds, "summary": summary},
                 manifest_dir=stage.manifest_dir, files=stage_files(store, stage))
    log.info("%s: end in %.1f s", stage.name, seconds)
    return {"stage": stage.name, "skipped": False, "seconds": seconds, "summary": summary}


def _check_inputs_available(stages: list[Stage], store: ArtifactStore, keys: dict[str, str]) -> None:
    requested = {stage.name for stage in stages}
    for stage in stages:
        for name in stage.inputs:
            if name not in requested and not is_finished(store, STAGES[name], keys[name]):
                raise ConfigError(
                    f"stage {stage.name} needs {name}, which is neither requested (--stages) nor finished "
                    f"in {store.root}; add {STAGES[name].group} to --stages"
                )


def run_pipeline(config: PipelineConfig, groups: list[str], output: str, *, force: list[str] = (),
                 executor: str = "ray", progress: bool = True) -> dict[str, dict]:
    """Run the stages of `groups` in dependency order; returns each stage's summary.

    Every stage that will compute holds its lock for the whole run; OutputLockedError if another run holds one."""
    stages = stages_for(groups)
    if not stages:
        raise ConfigError(f"no stage to run: --stages names none of {', '.join(GROUPS)}")
    store = ArtifactStore(output)
    keys = stage_keys(config)
    _check_inputs_available(stages, store, keys)
    to_run = {stage.name for stage in stages  # files are verified where the stage is skipped, once
              if stage.group in force or not is_finished(store, stage, keys[stage.name], verify=False)}
    locks = contextlib.nullcontext()
    if to_run:  # a finished output is read, never written: it may be read-only
        store.check_writable()
        locks = OutputLocks(store.lock_dir, sorted(to_run), {name: f"output {store.uri(STAGES[name].directory)} "
                                                              f"(stage {name})" for name in to_run},
                            config.locks.stale_after_s)
    with locks:
        return _execute(config, stages, store, keys, force, to_run, executor, progress)


def _execute(config: PipelineConfig, stages: list[Stage], store: ArtifactStore, keys: dict[str, str], force,
             to_run: set[str], executor: str, progress: bool) -> dict[str, dict]:
    config_json = config.model_dump(mode="json")
    results: dict[str, dict] = {}
    if executor == "local":
        threads = torch.get_num_threads()
        for stage in stages:
            try:
                results[stage.name] = execute_stage(stage.name, config_json, store.root, keys, stage.group in force,
                                                    progress, may_run=stage.name in to_run)
            except (ConfigError, ArtifactError):
                raise
            except Exception as error:  # what Ray reports for a stage task, said the same way
                raise StageError(f"stage {stage.name} failed: {describe_error(error)}") from error
            finally:  # a stage's thread count is its own, not the calling process's (a notebook, a test)
                torch.set_num_threads(threads)
        return results

    import ray

    started_here = init_ray(config)
    try:
        return _run_on_ray(config, stages, config_json, store.root, keys, force, to_run, progress)
    finally:
        if started_here:
            ray.shutdown()  # a driver that outlives us (a test, a notebook) must not hold a dead cluster


def _run_on_ray(config: PipelineConfig, stages: list[Stage], config_json: dict, output: str,
                keys: dict[str, str], force, to_run: set[str], progress: bool) -> dict[str, dict]:
    import ray

    results: dict[str, dict] = {}
    refs = {}
    remote = ray.remote(execute_stage)
    for stage in stages:
        res = config.resources.for_stage(stage.group)
        deps = [refs[name] for name in stage.inputs if name in refs]
        # Ray Train's workers hold the resources, not the stage task; attribution's task is one of its workers
        coordinator = res.num_workers > 1 and not stage.task_is_a_worker
        refs[stage.name] = remote.options(
            num_cpus=0.01 if coordinator else res.num_cpus, num_gpus=0 if coordinator else res.num_gpus,
            memory=int(res.memory_gb * 2**30) if res.memory_gb else None,
            name=f"stage:{stage.name}", max_retries=0,
        ).remote(stage.name, config_json, output, keys, stage.group in force, progress, *deps,
                 may_run=stage.name in to_run)
    pending = {ref: name for name, ref in refs.items()}
    try:
        _collect(pending, results)
    except KeyboardInterrupt:  # Ctrl-C: stop the running stages too; their checkpoints let a rerun resume
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    return results


def _collect(pending: dict, results: dict[str, dict]) -> None:
    """Wait for every stage task in `pending` (ref -> stage name), filling `results`; the first failure raises."""
    import ray

    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(done[0])
        try:
            results[name] = ray.get(done[0])
        except ray.exceptions.RayTaskError as error:  # the stage's own exception, re-raised as itself
            cause = error.as_instanceof_cause()
            if isinstance(cause, (ConfigError, ArtifactError)):
                raise cause from None
            raise StageError(f"stage {name} failed: {describe_error(error.cause)}") from error
        except ray.exceptions.RayError as error:  # killed worker, out of memory, lost node
            first_line = str(error).strip().splitlines()[0]
            raise StageError(f"stage {name} did not finish: {type(error).__name__}: {first_line}; rerun the "
                             "same command to resume from its last checkpoint") from error


def init_ray(config: PipelineConfig) -> bool:
    """Connect to RAY_ADDRESS / config.ray.address, or start embedded Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or config.ray.address
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}} if not address else None
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_worker_niceness", "0")  # Ray nices workers by default; stages are the work
            # "local": a new embedded instance even when a `ray start` head runs on this machine
            ray.init(address="local", num_cpus=config.ray.num_cpus, include_dashboard=False,
                     runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"cannot connect to Ray at {address!r}: {exc}") from None
    return True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on an address nobody listens at (ray.init would retry for minutes)."""
    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not host:port (or ray://host:port)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port} ({exc})") from None
