"""Compaction: a variant's committed graphs copied into one pack file per table, committed in one step.

`compact(reader, variant)` copies the variant's committed graphs into one pack file per table; the pack's
`graphs` file, moved into place last, commits the whole pack in one step, and only then are the per-graph
files and the older pack removed. Deleting a packed graph writes a deletion mark (`_{graph_id}.deleted`)
that hides the pack's copy. Compaction and writers of the same variant must not overlap (the pipeline
compacts after its attribution stage); readers may run at any time (attribution/store/reader.py).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from attribution.schema import DATA_TABLES, ROW_COUNTS, WRITE_ORDER, tagged
from attribution.store.files import PACK, ROW_GROUP_ROWS, Vanished, map_threaded
from attribution.store.ids import StoreError, check_variant
from attribution.store.reader import Listing, StoreReader, Where


def compact(reader: StoreReader, variant: str) -> dict:
    """Pack the variant's committed graphs into one file per table (GraphStore.compact says more); returns a
    summary: the pack, its graphs, how many came from their own files."""
    files = reader.files
    variant = check_variant(variant)
    files.sweep_once(variant)
    listing = reader.retrying(lambda: reader.list_variant(variant))
    old = listing.pack
    if not listing.commits and not listing.deleted:  # nothing to pack; leftovers of a stopped compaction go
        if old is not None:
            _remove_compacted(reader, listing, old.name, set(old.row_of))
        return {"variant": variant, "pack": old.name if old else None,
                "graphs": old.graphs.num_rows if old else 0, "from_files": 0}
    try:
        ids = sorted(listing.commits)
        commits = dict(zip(ids, map_threaded(functools.partial(reader.read_commit, variant), ids)))
    except Vanished as gone:
        raise StoreError(f"{gone.path} vanished while compacting variant {variant}: a writer is writing it; "
                         "compact when it is done") from None
    kept_rows = listing.pack_rows()
    parts = ([old.graphs.take(pa.array(kept_rows, pa.int64()))] if old is not None else []) + list(commits.values())
    graphs = pa.concat_tables(parts) if parts else tagged("graphs").empty_table()
    generation = int(PACK.match(old.name)["generation"]) + 1 if old is not None else 1
    name = f"{generation:08d}-{uuid.uuid4().hex[:12]}"
    for table in DATA_TABLES:
        written = files.write_pieces(table, _pack_pieces(reader, table, listing, commits),
                                     files.pack_path(table, variant, name))
        expected = pc.sum(graphs[ROW_COUNTS[table]]).as_py() or 0
        if written != expected:
            raise StoreError(f"compacting variant {variant}: wrote {written} {table} rows, its graphs rows count "
                             f"{expected}; the store was left as it was")
    files.write_file("graphs", graphs, files.pack_path("graphs", variant, name))  # the commit
    _remove_compacted(reader, listing, name, set(graphs["graph_id"].to_pylist()))
    return {"variant": variant, "pack": name, "graphs": graphs.num_rows, "from_files": len(commits)}


def _pack_pieces(reader: StoreReader, table: str, listing: Listing, commits: dict[str, pa.Table]
                 ) -> Iterator[pa.Table]:
    """A table's rows for the new pack, in its graphs rows' order: the old pack's (less hidden graphs),
    then each graph's own file (checked against its commit row)."""
    old = listing.pack
    if old is not None and listing.pack_rows():
        hidden = pa.array(listing.hidden(), pa.string())
        parquet, _, _ = reader.open_pack(old, table)
        for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
            rows = pa.Table.from_batches([batch])
            yield rows.filter(pc.invert(pc.is_in(rows["graph_id"], value_set=hidden))) if len(hidden) else rows
    try:
        yield from map_threaded(lambda item: reader.read_located(Where(listing.variant, *item, None), table),
                                commits.items())
    except Vanished as gone:
        raise StoreError(f"{gone.path} is missing: its graph is incomplete; rewrite or delete it before "
                         "compacting") from None


def _remove_compacted(reader: StoreReader, listing: Listing, pack: str, packed: set[str]) -> None:
    """After a pack's commit: deletion marks, then the per-graph commits it copied (one rewritten meanwhile
    stays), then the data files of packed graphs that have no commit now, then every other pack (graphs
    file first). Each step leaves every graph readable once; a stop in between leaves leftovers that
    readers skip and the next compaction removes."""
    files, variant = reader.files, listing.variant
    for graph_id in listing.deleted:
        files.delete_quietly(files.deletion_mark(variant, graph_id))
    for seen in listing.commits.values():
        now = files.fs.get_file_info(seen.path)
        if now.type == pafs.FileType.File and (now.mtime_ns, now.size) == (seen.mtime_ns, seen.size):
            files.delete_quietly(seen.path)
    committed = set(reader.list_variant_commits(variant))
    for table in DATA_TABLES:
        for info in files.files(files.folder(table, variant)):
            stem = info.base_name[:-len(".parquet")]
            if info.base_name.endswith(".parquet") and stem in packed and stem not in committed:
                files.delete_quietly(info.path)
    for table in reversed(WRITE_ORDER):
        for info in files.files(f"{files.folder(table, variant)}/packs"):
            stem = info.base_name[:-len(".parquet")]
            if info.base_name.endswith(".parquet") and PACK.match(stem) and stem != pack:
                files.delete_quietly(info.path)
