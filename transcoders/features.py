"""Feature dashboards as stored beside a CLT, and read back: the Parquet schemas, writing, reading.

`clt_dir/features/` holds `features.parquet` (one row per feature), `feature_examples.parquet` (one row
per context) and `features.json`, written last: a directory without it is unfinished. They are built by
`transcoders.dashboards.build_dashboards`; `open_features(clt_dir)` reads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from runtime.files import write_atomic, write_json_atomic

FEATURES_DIR = "features"
FEATURES_FILE = "features.parquet"
EXAMPLES_FILE = "feature_examples.parquet"
META_FILE = "features.json"  # written last: the commit record
FORMAT_VERSION = 1
LABEL_SOURCE_AUTO = "auto"

_TOKEN_LIST = pa.list_(pa.string())
_ID_LIST = pa.list_(pa.int32())
FEATURES_SCHEMA = pa.schema([
    ("layer", pa.int32()),
    ("feature", pa.int32()),
    ("density", pa.float64()),  # fraction of scanned tokens on which the feature is active
    ("n_active", pa.int64()),
    ("mean_activation", pa.float32()),  # over active tokens; null when never active
    ("max_activation", pa.float32()),  # 0 when never active
    ("label", pa.string()),
    ("label_source", pa.string()),  # "auto": made by auto_label from the evidence below
    ("promoted_tokens", _TOKEN_LIST), ("promoted_token_ids", _ID_LIST),
    ("suppressed_tokens", _TOKEN_LIST), ("suppressed_token_ids", _ID_LIST),
    ("input_tokens", _TOKEN_LIST), ("input_token_ids", _ID_LIST),
])
EXAMPLES_SCHEMA = pa.schema([
    ("layer", pa.int32()),
    ("feature", pa.int32()),
    ("kind", pa.string()),  # "top" (rank 0 = highest) or "random" (rank 0 = lowest activation)
    ("rank", pa.int32()),
    ("activation", pa.float32()),  # at the activating token
    ("block", pa.int32()),  # held-out block index
    ("position", pa.int32()),  # of the activating token in its block (>= 1: position 0 is never read)
    ("window_index", pa.int32()),  # of the activating token in the lists below
    ("tokens", _ID_LIST),
    ("token_strings", _TOKEN_LIST),
    ("activations", pa.list_(pa.float32())),  # the feature's activation on each window token
])


class FeaturesError(ValueError):
    """Missing, unfinished or corrupted feature dashboards; the message names the file."""


def _write_parquet(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=65536))


def write_dashboards(clt_dir: str | Path, features: pa.Table, examples: pa.Table, meta: dict) -> dict:
    """Write the two tables (each to a temporary file, then renamed), then features.json, the commit record."""
    directory = Path(clt_dir) / FEATURES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    _write_parquet(features.cast(FEATURES_SCHEMA), directory / FEATURES_FILE)
    _write_parquet(examples.cast(EXAMPLES_SCHEMA), directory / EXAMPLES_FILE)
    meta = {"format_version": FORMAT_VERSION, **meta}
    write_json_atomic(directory / META_FILE, meta)
    return meta


def has_features(clt_dir: str | Path) -> bool:
    """Whether `clt_dir` holds finished feature dashboards (its features.json commit record)."""
    return (Path(clt_dir) / FEATURES_DIR / META_FILE).is_file()


class FeatureDashboards:
    """Read access to `clt_dir/features/`; every read checks the file and its schema."""

    def __init__(self, clt_dir: str | Path):
        self.directory = Path(clt_dir) / FEATURES_DIR
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FeaturesError(f"{self.directory} holds no finished feature dashboards (no {META_FILE}); "
                                "run the pipeline's features stage, or transcoders.stage.build_features")
        try:
            self.meta = json.loads(meta_path.read_text())
            if self.meta["format_version"] != FORMAT_VERSION:
                raise ValueError(f"format_version {self.meta['format_version']}, this code reads {FORMAT_VERSION}")
        except (ValueError, KeyError, TypeError) as exc:
            raise FeaturesError(f"{meta_path} is corrupted ({exc}); rebuild the dashboards") from exc

    def _read(self, name: str, schema: pa.Schema, filters=None) -> pd.DataFrame:
        path = self.directory / name
        if not path.is_file():
            raise FeaturesError(f"{path} is missing although {META_FILE} says the dashboards are finished; "
                                "rebuild them")
        try:
            found = pq.read_schema(path)
            if not found.equals(schema, check_metadata=False):
                raise ValueError(f"schema {found.names} is not the {name} schema {schema.names}")
            return pq.read_table(path, filters=filters).to_pandas()
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise FeaturesError(f"{path} is corrupted or not a {name} table ({exc}); rebuild the dashboards") from exc

    def features(self) -> pd.DataFrame:
        """One row per feature (see FEATURES_SCHEMA), ordered by (layer, feature)."""
        return self._read(FEATURES_FILE, FEATURES_SCHEMA)

    def examples(self, layer: int | None = None, feature: int | None = None, kind: str | None = None
                 ) -> pd.DataFrame:
        """Contexts (see EXAMPLES_SCHEMA), optionally of one layer / feature / kind ("top" or "random")."""
        if kind not in (None, "top", "random"):
            raise ValueError(f"kind must be 'top', 'random' or None, got {kind!r}")
        filters = [(name, "=", value) for name, value in (("layer", layer), ("feature", feature), ("kind", kind))
                   if value is not None]
        return self._read(EXAMPLES_FILE, EXAMPLES_SCHEMA, filters or None).reset_index(drop=True)

    def labels(self) -> dict[tuple[int, int], str]:
        """(layer, feature) -> label."""
        table = self.features()
        return dict(zip(zip(table["layer"].tolist(), table["feature"].tolist()), table["label"]))


def open_features(clt_dir: str | Path) -> FeatureDashboards:
    """The feature dashboards stored beside the CLT in `clt_dir`; FeaturesError when missing or corrupted."""
    return FeatureDashboards(clt_dir)
