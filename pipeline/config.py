"""The pipeline config: one section per stage, validated on load with messages that name the field."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from attribution.config import AttributionStageConfig
from comparison.config import CompareConfig
from sparse_attention.config import SparsifyConfig
from transcoders.config import CLTStageConfig, FeaturesConfig

PRESET_DIR = Path(resources.files("pipeline") / "presets")  # package data: ships in the wheel


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used; the message says which field and why."""


class StageResources(BaseModel):
    """What one stage asks Ray for; num_cpus is also the stage's torch thread count."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: int = Field(1, ge=1, description="per worker; a whole number, since it is also the torch thread count")
    num_gpus: float = Field(0, ge=0, description="per worker")
    memory_gb: float | None = Field(None, gt=0)
    num_workers: int = Field(1, ge=1, description="data-parallel training workers (Ray Train, DDP), or attribution "
                             "workers (the stage task and num_workers - 1 actors, each loads the model once); "
                             "1 = plain task")
    use_gpu: bool = Field(False, description="data-parallel workers take one GPU each")


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: StageResources = StageResources()
    stages: dict[str, StageResources] = {}

    def for_stage(self, group: str) -> StageResources:
        return self.stages.get(group, self.default)


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="cluster address; None starts embedded Ray (RAY_ADDRESS wins)")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for embedded Ray; None = all")


class LocksConfig(BaseModel):
    """Stage locks (pipeline/locks.py): a run holds one per stage it computes, refreshed while it runs."""

    model_config = ConfigDict(extra="forbid")

    stale_after_s: float = Field(600, gt=0, description="a lock not refreshed for this long is stale and taken "
                                 "over (a dead holder on this host is detected at once)")


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sparsify: SparsifyConfig = SparsifyConfig()
    clt: CLTStageConfig = CLTStageConfig()
    features: FeaturesConfig = FeaturesConfig()
    attribution: AttributionStageConfig = AttributionStageConfig()
    compare: CompareConfig = CompareConfig()
    resources: ResourcesConfig = ResourcesConfig()
    ray: RayConfig = RayConfig()
    locks: LocksConfig = LocksConfig()


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _format_validation_error(source: str, error: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {where}: {item['msg']}")
    return "\n".join(lines)


def _booleans_taken_as_numbers(raw, validated, where: str = "") -> list[str]:
    """Dotted paths where the YAML said true/false and validation made a number of it (pydantic's lax mode
    reads `steps: true` as 1). Walks the raw mapping beside the validated config, so every stage's config
    is covered without strict types in each."""
    if isinstance(raw, bool):
        return [where] if isinstance(validated, (int, float)) and not isinstance(validated, bool) else []
    found = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            child = validated.get(key) if isinstance(validated, dict) else getattr(validated, str(key), None)
            found += _booleans_taken_as_numbers(value, child, f"{where}.{key}" if where else str(key))
    elif isinstance(raw, (list, tuple)) and isinstance(validated, (list, tuple)) and len(raw) == len(validated):
        for index, (value, child) in enumerate(zip(raw, validated)):
            found += _booleans_taken_as_numbers(value, child, f"{where}.{index}")
    return found


def parse_config(raw: dict, source: str) -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping of stage sections, got {type(raw).__name__}")
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_validation_error(source, error)) from None
    booleans = _booleans_taken_as_numbers(raw, config)
    if booleans:
        raise ConfigError("\n".join([f"invalid config {source}:"] + [
            f"  {where}: expected a number, got a boolean (true/false)" for where in booleans]))
    return config


def apply_override(raw: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a raw config mapping."""
    key, sep, value = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} must look like section.field=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(value)


def load_config(
    path: str | Path | None = None, preset: str | None = None, overrides: list[str] | None = None
) -> PipelineConfig:
    """Load a YAML config file or a named preset (exactly one), then apply `key=value` overrides."""
    if (path is None) == (preset is None):
        raise ConfigError("give exactly one of --config FILE or --preset NAME")
    if preset is not None:
        if preset not in available_presets():
            raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(available_presets())}")
        path = PRESET_DIR / f"{preset}.yaml"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return parse_config(raw, str(path))
