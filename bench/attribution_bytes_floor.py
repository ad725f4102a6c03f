"""How small can one graph's stored tables get without losing information? Reads the stores that
bench/attribution_step.py left in its --work folder (one per timing case) and measures, per case:

- the stored bytes per table and per column (Parquet's compressed sizes);
- the skip rows of head_loadings (head -1): each is the edge's weight less the other rows of its (edge,
  layer), so it could be derived at read time; checked here on the stored values (largest difference
  from the stored row, relative to |edge|), and the bytes of head_loadings rewritten without them (the
  store's writer settings: zstd, float columns byte-stream split, dictionaries for the rest);
- a floor for the float columns that must stay (head-part weights, pair shares, QK values): the order-0
  entropy of each of their four byte streams (what zstd on byte-stream-split floats approaches), in bytes.

    .venv/bin/python bench/attribution_bytes_floor.py --work /tmp/attribution-step-bench

Results: bench/results/attribution_bytes_floor.json. Nothing is timed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("graphs", "nodes", "edges", "head_loadings", "qk_pairs")


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per column of one Parquet file."""
    metadata = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            out[chunk.path_in_schema] = out.get(chunk.path_in_schema, 0) + chunk.total_compressed_size
    return out


def float_floor_bytes(values: np.ndarray) -> float:
    """Order-0 entropy of the four byte streams of float32 values, in bytes."""
    streams = np.ascontiguousarray(values.astype(np.float32)).view(np.uint8).reshape(-1, 4)
    total = 0.0
    for stream in streams.T:
        p = np.bincount(stream, minlength=256) / len(stream)
        p = p[p > 0]
        total += -(p * np.log2(p)).sum() / 8 * len(stream)
    return total


def written_bytes(table: pa.Table) -> int:
    """Bytes of `table` written as the store writes (attribution/store/files.py)."""
    sys.path.insert(0, str(ROOT))
    from attribution.store.files import ROW_GROUP_ROWS, float_columns

    floats = float_columns(table.schema)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", use_byte_stream_split=floats,
                   use_dictionary=[f.name for f in table.schema if f.name not in floats], row_group_size=ROW_GROUP_ROWS)
    return buffer.tell()


def case(store: Path) -> dict:
    files = {t: next((store / t / "variant=dense").glob("*.parquet")) for t in TABLES}
    sizes = {t: files[t].stat().st_size for t in TABLES}
    loadings = pq.read_table(files["head_loadings"])
    frame = loadings.to_pandas()
    edges = pq.read_table(files["edges"]).to_pandas()
    qk = pq.read_table(files["qk_pairs"]).to_pandas()
    head = frame["head"].to_numpy()
    skip = head == -1
    edge_weight = edges.set_index(["target", "source"])["weight"].astype(np.float64)
    keys = ["target", "source", "layer"]
    rest = frame[~skip].assign(w=frame["weight"].astype(np.float64)).groupby(keys)["w"].sum()
    skips = frame[skip].set_index(keys)["weight"].astype(np.float64)
    weight = edge_weight.reindex(skips.index.droplevel("layer")).to_numpy()
    derived = weight - rest.reindex(skips.index).fillna(0.0).to_numpy()
    without_skip = loadings.filter(pa.array(~skip))
    floats = {"head_weight_without_skip": float_floor_bytes(frame["weight"].to_numpy()[~skip]),
              "pair_share": float_floor_bytes(frame["pair_share"].dropna().to_numpy()),
              "qk_value": float_floor_bytes(qk["value"].to_numpy())}
    return {
        "stored_bytes": sizes, "stored_total": sum(sizes.values()),
        "column_bytes": {t: column_bytes(files[t]) for t in ("head_loadings", "qk_pairs")},
        "head_loading_rows": {"skip": int(skip.sum()), "other_heads": int((head == -2).sum()),
                              "heads": int((head >= 0).sum())},
        "skip_derived_max_relative_difference": float(np.max(np.abs(derived - skips.to_numpy()) / np.abs(weight))),
        "head_loadings_bytes": written_bytes(loadings),
        "head_loadings_without_skip_bytes": written_bytes(without_skip),
        "float_floor_bytes": floats, "float_floor_total": sum(floats.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="bench/attribution_step.py's --work folder")
    parser.add_argument("--step-results", type=Path, default=ROOT / "bench" / "results" / "attribution_step.json",
                        help="its results (for circuit-tracer's .pt bytes of each case)")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "attribution_bytes_floor.json")
    args = parser.parse_args(argv)
    step = json.loads(args.step_results.read_text())
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cases": {}}
    for name, timing in step["timing"].items():
        scale = name.removeprefix("decoder_")
        stores = sorted(args.work.glob(f"{scale}_after_*/store"))
        if not stores:
            continue
        result = case(stores[-1])
        pt = timing["after_bytes"]["circuit_tracer_pt"]
        without = result["stored_total"] - result["stored_bytes"]["head_loadings"] + result["head_loadings_without_skip_bytes"]
        result.update({"circuit_tracer_pt": pt, "stored_over_circuit_tracer": result["stored_total"] / pt,
                       "without_skip_over_circuit_tracer": without / pt,
                       "float_floor_over_circuit_tracer": result["float_floor_total"] / pt, "goal_bytes": pt / 4})
        report["cases"][name] = result
        print(name, json.dumps({k: result[k] for k in ("stored_over_circuit_tracer", "without_skip_over_circuit_tracer",
                                                       "float_floor_over_circuit_tracer",
                                                       "skip_derived_max_relative_difference")}), flush=True)
    args.output.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
