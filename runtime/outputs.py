"""A stage's output directory: created on first use, with the stage's config saved beside its outputs."""

from __future__ import annotations

from pathlib import Path

import yaml

from runtime.distributed import is_main_rank
from runtime.files import write_text_atomic


def open_output_dir(output_dir: str | Path, config_file: str, config: dict) -> Path:
    """Create `output_dir` and save `config` (a config model's JSON dump) in it as YAML `config_file`;
    data parallel, rank 0 alone writes it. Returns the directory as a Path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if is_main_rank():
        write_text_atomic(output_dir / config_file, yaml.safe_dump(config, sort_keys=False))
    return output_dir
