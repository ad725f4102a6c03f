"""The attribution store: write graphs atomically, read them back as pandas DataFrames or a pyarrow dataset.

Layout and tables: see attribution/schema.py. A store lives on a local path or any pyarrow filesystem
URI (file://, s3://, gs://, hdfs://...). Every variant, graph id and failure id is checked against a
strict pattern before any path is built from it.

Commits. Each file is written under a temporary name (starting with '.', so directory scans skip it) and
moved into place. A graph's one-row `graphs` file is its commit: written last, removed first, so a reader
sees a graph whole or not at all. `compact(variant)` copies the variant's committed graphs into one pack
file per table; the pack's `graphs` file, moved into place last, commits the whole pack in one step, and
only then are the per-graph files and the older pack removed. Deleting a packed graph writes a deletion
mark (`_{graph_id}.deleted`) that hides the pack's copy.

Readers list a variant's per-graph `graphs` folder (commits and deletion marks) first and its packs
second; a per-graph commit wins over the pack's copy (it is the same graph or a newer rewrite), a deletion
mark hides it, and a file that vanishes mid-read (a compaction has just finished) makes the reader look
again. So every reader, during a compaction too, sees each committed graph exactly once. Each read checks
the files against the graph's commit row: graph_id and row count of every table.

A writer killed mid-file leaves its temporary file, which reads ignore and the next writer of that
variant removes (`remove_stale_temporaries`). Compaction and writers of the same variant must not overlap
(the pipeline compacts after its attribution stage); readers may run at any time.
"""

from __future__ import annotations

import functools
import hashlib
import numbers
import operator
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution.records import GraphRecord
from attribution.replacement import AttributionError
from attribution.schema import (
    DATA_TABLES,
    GRAPHS,
    ROW_COUNTS,
    SCHEMAS,
    TABLES,
    WRITE_ORDER,
    check_schema,
    tagged,
)

_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")  # graph and failure ids
_PACK = re.compile(r"^(?P<generation>\d{8})-[0-9a-f]{12}$")
_DELETED = re.compile(r"^_(?P<graph_id>[A-Za-z0-9][A-Za-z0-9_-]{0,127})\.deleted$")
ROW_GROUP_ROWS = 32768
READ_THREADS = 8  # files read at once when a listing or a compaction reads one file per graph
READ_ATTEMPTS = 4  # a reader looks again this often when files vanish under it (a compaction finishing)
TMP_MAX_AGE_S = 3600.0  # a write holds its temporary file for seconds: one this old was abandoned
# temporary files: ".{name}.parquet.tmp-{pid space}-{pid}-{token}" (older writers: no leading '.', no pid)
_TMP = re.compile(r"\.parquet\.tmp-(?:(?P<space>[0-9a-f]{12})-(?P<pid>\d+)-)?[0-9a-f]{32}$")

T = TypeVar("T")
S = TypeVar("S")


def _pid_space() -> str:
    """Where a pid names one process: this host and pid namespace (containers on one host have their own)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}/{namespace}".encode()).hexdigest()[:12]


PID_SPACE = _pid_space()


def _alive(pid: int) -> bool:
    """Whether a process of this pid space exists (a zombie or another user's process counts)."""
    if pid <= 0:
        return True  # not a pid we may probe: keep its file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _map_threaded(read: Callable[[S], T], items: Iterable[S], window: int = 1024) -> Iterator[T]:
    """`read` of each item in order, READ_THREADS at a time (file reads wait on I/O, not the GIL), at most
    `window` results ahead of the consumer."""
    items = list(items)
    if len(items) < 2:
        yield from map(read, items)
        return
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(items), window):
            yield from pool.map(read, items[start:start + window])


class StoreError(AttributionError):
    """A store, file or graph that cannot be read or written; the message says which and why."""


class GraphNotFoundError(StoreError, KeyError):
    """No committed graph with this id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class _Vanished(Exception):
    """A file named a moment ago is gone (a compaction or a rewrite finished): look again."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


@dataclass
class StoredGraph:
    """One graph read back from the store."""

    info: pd.Series  # the graphs row
    nodes: pd.DataFrame
    edges: pd.DataFrame
    head_loadings: pd.DataFrame
    qk_pairs: pd.DataFrame


def check_variant(variant: str) -> str:
    if not isinstance(variant, str) or not _VARIANT.match(variant):
        raise StoreError(f"variant {variant!r} must be 1-128 letters, digits, '_', '.', '-', starting with a "
                         "letter or digit (it names a directory)")
    return variant


def check_id(graph_id: str, what: str = "graph id") -> str:
    """A graph or failure id as the store accepts it (it names a file), else StoreError."""
    if not isinstance(graph_id, str) or not _ID.match(graph_id):
        raise StoreError(f"{what} {graph_id!r} must be 1-128 letters, digits, '_' or '-', starting with a "
                         "letter or digit (it names a file)")
    return graph_id


def check_table(name: str, tables: Iterable[str] = TABLES) -> str:
    if name not in tables:
        raise StoreError(f"unknown table {name!r}; tables are {list(tables)}")
    return name


@dataclass
class _Pack:
    """A committed pack of one variant: its graphs rows in pack order, and where each graph's rows start."""

    variant: str
    name: str
    graphs: pa.Table
    row_of: dict[str, int]  # graph_id -> its row in `graphs`
    starts: dict[str, np.ndarray]  # table -> first row of each graph in the table's pack file, then the total
    files: dict[str, tuple[pq.FileMetaData, np.ndarray]] = field(default_factory=dict)  # opened: metadata, row-group starts


@dataclass
class _Listing:
    """One variant's commits at one moment: per-graph commit files, deletion marks and the live pack."""

    variant: str
    commits: dict[str, pafs.FileInfo]  # graph_id -> its per-graph graphs file
    deleted: set[str]  # packed graphs deleted since the pack was made
    pack: _Pack | None

    def hidden(self) -> list[str]:
        """The pack's graphs that a per-graph commit or a deletion mark overrides."""
        if self.pack is None:
            return []
        return sorted(g for g in self.pack.row_of if g in self.commits or g in self.deleted)

    def pack_rows(self) -> list[int]:
        """Rows of the pack's graphs that readers see there (in pack order)."""
        if self.pack is None:
            return []
        hidden = set(self.hidden())
        return [row for graph_id, row in self.pack.row_of.items() if graph_id not in hidden]


@dataclass
class _Where:
    """Where one committed graph is read from: its own files (pack None) or a pack."""

    variant: str
    graph_id: str
    info: pa.Table  # its one-row graphs record
    pack: _Pack | None

    def rows(self, table: str) -> int:
        return self.info[ROW_COUNTS[table]][0].as_py()


class GraphStore:
    """A directory of attribution graphs on a pyarrow filesystem."""

    def __init__(self, uri: str | Path, filesystem: pafs.FileSystem | None = None):
        if filesystem is not None:
            self.fs, self.root = filesystem, str(uri).rstrip("/")
        elif isinstance(uri, Path) or "://" not in str(uri):
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
        else:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(str(uri))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as err:
                raise StoreError(f"cannot open store {uri}: {err}") from None
            self.root = self.root.rstrip("/")
        self._variant_of: dict[str, str] = {}
        self._packs: dict[str, _Pack] = {}  # variant -> its live pack as last read (pack files never change)
        self._swept: set[str] = set()  # variants whose stale temporary files this store removed

    def __repr__(self) -> str:
        return f"GraphStore({self.fs.type_name}:{self.root})"

    # -- paths ---------------------------------------------------------------------------------
    def path(self, table: str, variant: str, graph_id: str) -> str:
        """The per-graph file of one table (or the failures file of `graph_id` for table "failures")."""
        check_table(table, SCHEMAS)
        return f"{self._folder(table, variant)}/{check_id(graph_id)}.parquet"

    def _folder(self, table: str, variant: str) -> str:
        return f"{self.root}/{table}/variant={check_variant(variant)}"

    def _pack_path(self, table: str, variant: str, pack: str) -> str:
        return f"{self._folder(table, variant)}/packs/{pack}.parquet"

    def _deletion_mark(self, variant: str, graph_id: str) -> str:
        return f"{self._folder('graphs', variant)}/_{check_id(graph_id)}.deleted"

    def variants(self, table: str = "graphs") -> list[str]:
        """Variants that have a folder in `table` (for graphs: at least one committed graph)."""
        check_table(table, SCHEMAS)
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True))
        names = (i.base_name.split("=", 1)[1] for i in infos
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("variant="))
        return sorted(v for v in names if _VARIANT.match(v))

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _files(self, folder: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File]

    # -- reading primitives --------------------------------------------------------------------
    def _retrying(self, read: Callable[[], T]) -> T:
        """Run `read`, again if a file vanished under it; a file still missing then is missing."""
        for _ in range(READ_ATTEMPTS):
            try:
                return read()
            except _Vanished as gone:
                missing = gone.path
        raise StoreError(f"{missing} is missing: the store is incomplete; rewrite the graph")

    def _open(self, name: str, path: str, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
        """Open one of our Parquet files, checking it is the table it should be."""
        try:
            parquet = pq.ParquetFile(self.fs.open_input_file(path), metadata=metadata)
        except FileNotFoundError:
            raise _Vanished(path) from None
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"{path} is corrupted or not a Parquet file ({err}); delete it and rewrite the graph"
                             ) from None
        problem = check_schema(name, parquet.schema_arrow, path)
        if problem:
            raise StoreError(problem)
        return parquet

    def _read(self, parquet: pq.ParquetFile, path: str, read: Callable[[pq.ParquetFile], T]) -> T:
        try:
            return read(parquet)
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"{path} is corrupted ({err}); delete it and rewrite the graph") from None

    def _read_commit(self, variant: str, graph_id: str) -> pa.Table:
        """A per-graph commit row, checked: one row, this graph and variant, row counts present."""
        path = self.path("graphs", variant, graph_id)
        info = self._read(self._open("graphs", path), path, lambda p: p.read())
        problem = None
        if info.num_rows != 1:
            problem = f"has {info.num_rows} rows, not 1"
        elif info["graph_id"][0].as_py() != graph_id or info["variant"][0].as_py() != variant:
            problem = f"is the record of graph {info['graph_id'][0]} of variant {info['variant'][0]}"
        elif any(info[c][0].as_py() is None for c in ROW_COUNTS.values()):
            problem = "lacks row counts"
        if problem:
            raise StoreError(f"graph {graph_id}: its graphs file {path} {problem}; delete it and rewrite the graph")
        return info

    def _live_pack(self, variant: str) -> _Pack | None:
        """The variant's committed pack of the highest generation (its graphs file exists), or None."""
        folder = f"{self._folder('graphs', variant)}/packs"
        names = sorted(i.base_name[:-len(".parquet")] for i in self._files(folder)
                       if i.base_name.endswith(".parquet") and _PACK.match(i.base_name[:-len(".parquet")]))
        if not names:
            return None
        cached = self._packs.get(variant)
        if cached is not None and cached.name == names[-1]:
            return cached
        pack = self._load_pack(variant, names[-1])
        self._packs[variant] = pack
        return pack

    def _load_pack(self, variant: str, name: str) -> _Pack:
        path = self._pack_path("graphs", variant, name)
        graphs = self._read(self._open("graphs", path), path, lambda p: p.read())
        ids = graphs["graph_id"].to_pylist()
        problem = None
        if len(set(ids)) != len(ids) or None in ids:
            problem = "repeats a graph id"
        elif graphs.num_rows and set(graphs["variant"].to_pylist()) != {variant}:
            problem = f"holds variants {sorted(set(graphs['variant'].to_pylist()), key=str)}"
        elif any(graphs[c].null_count for c in ROW_COUNTS.values()):
            problem = "lacks row counts"
        if problem:
            raise StoreError(f"pack {path} {problem}; delete the variant's packs and attribute again")
        starts = {t: np.concatenate([[0], np.cumsum(graphs[ROW_COUNTS[t]].to_numpy())]).astype(np.int64)
                  for t in DATA_TABLES}
        return _Pack(variant, name, graphs, {g: row for row, g in enumerate(ids)}, starts)

    def _list_variant(self, variant: str) -> _Listing:
        """Per-graph commits and deletion marks first, the live pack second (the order readers rely on)."""
        commits, deleted = {}, set()
        for info in self._files(self._folder("graphs", variant)):
            name = info.base_name
            if name.endswith(".parquet") and _ID.match(name[:-len(".parquet")]):
                commits[name[:-len(".parquet")]] = info
            elif match := _DELETED.match(name):
                deleted.add(match["graph_id"])
        return _Listing(variant, commits, deleted, self._live_pack(variant))

    def _list_variant_commits(self, variant: str) -> list[str]:
        return [i.base_name[:-len(".parquet")] for i in self._files(self._folder("graphs", variant))
                if i.base_name.endswith(".parquet") and _ID.match(i.base_name[:-len(".parquet")])]

    def _locate_in(self, variant: str, graph_id: str) -> _Where | None:
        """The graph in this variant: its own commit first, then (unless marked deleted) the live pack."""
        try:
            return _Where(variant, graph_id, self._read_commit(variant, graph_id), None)
        except _Vanished:
            pass
        if self._exists(self._deletion_mark(variant, graph_id)):
            return None
        pack = self._live_pack(variant)
        if pack is None or graph_id not in pack.row_of:
            return None
        return _Where(variant, graph_id, pack.graphs.slice(pack.row_of[graph_id], 1), pack)

    def _locate(self, graph_id: str) -> _Where:
        check_id(graph_id)
        cached = self._variant_of.get(graph_id)
        where = self._locate_in(cached, graph_id) if cached is not None else None
        for variant in self.variants() if where is None else []:
            if variant != cached and (where := self._locate_in(variant, graph_id)) is not None:
                break
        if where is None:
            raise GraphNotFoundError(f"graph {graph_id} is not in the store at {self.root}; list_graphs() shows "
                                     "what is")
        self._variant_of[graph_id] = where.variant
        return where

    def _check_file(self, parquet: pq.ParquetFile, table: str, where: _Where, path: str) -> None:
        """A per-graph file holds exactly the rows its graph's commit row counts, all of that graph."""
        rows, expected = parquet.metadata.num_rows, where.rows(table)
        if rows != expected:
            raise StoreError(f"graph {where.graph_id}: its {table} file {path} has {rows} rows, its graphs row says "
                             f"{expected}: the file belongs to another graph or is damaged; rewrite the graph")
        others = sorted(self._graph_ids_in(parquet, path) - {where.graph_id}, key=str)
        if others:
            raise StoreError(f"graph {where.graph_id}: its {table} file {path} holds rows of graph {others[0]}: "
                             "the file belongs to another graph; rewrite the graph")

    def _graph_ids_in(self, parquet: pq.ParquetFile, path: str) -> set:
        """The graph ids in a file, from its row-group statistics where they settle it (min == max, no nulls)."""
        column = parquet.schema_arrow.get_field_index("graph_id")
        ids = set()
        for group in range(parquet.metadata.num_row_groups):
            stats = parquet.metadata.row_group(group).column(column).statistics
            if stats is None or not stats.has_min_max or not stats.has_null_count or stats.null_count:
                graph_ids = self._read(parquet, path, lambda p: p.read(columns=["graph_id"]))["graph_id"]
                return set(pc.unique(graph_ids).to_pylist())
            ids.update((stats.min, stats.max))
        return ids

    def _open_pack(self, pack: _Pack, table: str) -> tuple[pq.ParquetFile, np.ndarray, str]:
        """One table's pack file (checked once: our schema, the rows its graphs rows count), its row-group
        starts and its path."""
        path = self._pack_path(table, pack.variant, pack.name)
        metadata, group_starts = pack.files.get(table, (None, None))
        parquet = self._open(table, path, metadata)
        if metadata is None:
            metadata = parquet.metadata
            if metadata.num_rows != pack.starts[table][-1]:
                raise StoreError(f"the {table} pack {path} has {metadata.num_rows} rows, its graphs rows count "
                                 f"{pack.starts[table][-1]}: the pack is damaged; delete the variant's packs")
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            pack.files[table] = (metadata, group_starts)
        return parquet, group_starts, path

    def _read_located(self, where: _Where, table: str, columns: list[str] | None = None) -> pa.Table:
        """One table of a located graph, checked against its commit row."""
        if table == "graphs":
            return where.info if columns is None else where.info.select(columns)
        if where.pack is None:
            path = self.path(table, where.variant, where.graph_id)
            parquet = self._open(table, path)
            self._check_file(parquet, table, where, path)
            return self._read(parquet, path, lambda p: p.read(columns=columns))
        pack, row = where.pack, where.pack.row_of[where.graph_id]
        start, stop = int(pack.starts[table][row]), int(pack.starts[table][row + 1])
        parquet, group_starts, path = self._open_pack(pack, table)
        wanted = columns if columns is None or "graph_id" in columns else [*columns, "graph_id"]
        first = int(np.searchsorted(group_starts, start, side="right")) - 1
        last = int(np.searchsorted(group_starts, stop, side="left"))
        groups = list(range(first, last)) if stop > start else []
        rows = self._read(parquet, path, lambda p: p.read_row_groups(groups, columns=wanted))
        rows = rows.slice(start - int(group_starts[first]), stop - start) if groups else rows.slice(0, 0)
        wrong = pc.not_equal(rows["graph_id"], pa.scalar(where.graph_id)) if rows.num_rows else None
        if rows.num_rows != stop - start or (wrong is not None and pc.any(pc.fill_null(wrong, True)).as_py()):
            raise StoreError(f"graph {where.graph_id}: rows {start}-{stop} of its {table} pack {path} are not all "
                             "its own: the pack is damaged; delete the variant's packs and attribute again")
        return rows if columns is None or "graph_id" in columns else rows.drop_columns(["graph_id"])

    def _read_graph(self, graph_id: str, read: Callable[[_Where], T]) -> T:
        """`read` on the located graph, located again if its files vanish under it."""
        return self._retrying(lambda: read(self._locate(graph_id)))

    # -- writing -------------------------------------------------------------------------------
    def write(self, record: GraphRecord) -> None:
        """Write (or replace) one graph; readers see the old graph, no graph, or the new one whole."""
        variant, graph_id = check_variant(record.variant), check_id(record.graph_id)
        missing = set(TABLES) - set(record.tables)
        if missing:
            raise StoreError(f"graph {graph_id} lacks tables {sorted(missing)}")
        tables = {name: self._record_table(record, name) for name in DATA_TABLES}
        tables["graphs"] = self._commit_row(record, tables)
        self._sweep_once(variant)
        self.delete(graph_id, missing_ok=True)  # uncommit first: no reader mixes old and new files
        for name in WRITE_ORDER:
            self._write_file(name, tables[name], self.path(name, variant, graph_id))
        self._variant_of[graph_id] = variant

    def _record_table(self, record: GraphRecord, name: str) -> pa.Table:
        """One of a record's tables in the store's schema, every row of this graph."""
        try:
            table = record.tables[name].cast(tagged(name))
        except (ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise StoreError(f"graph {record.graph_id}: its {name} table does not match the store's schema ({err})"
                             ) from None
        others = pc.unique(pc.filter(table["graph_id"], pc.not_equal(table["graph_id"], record.graph_id)))
        if len(others) or table["graph_id"].null_count:
            raise StoreError(f"graph {record.graph_id}: its {name} table holds rows of graph "
                             f"{others[0].as_py() if len(others) else None}")
        return table

    def _commit_row(self, record: GraphRecord, tables: dict[str, pa.Table]) -> pa.Table:
        """The record's graphs row with the row count of each of its tables."""
        graphs = record.tables["graphs"]
        if graphs.num_rows != 1 or graphs["graph_id"][0].as_py() != record.graph_id or \
                graphs["variant"][0].as_py() != record.variant:
            raise StoreError(f"graph {record.graph_id}: its graphs table must be one row of graph "
                             f"{record.graph_id}, variant {record.variant}")
        graphs = graphs.drop_columns([c for c in ROW_COUNTS.values() if c in graphs.column_names])
        for name, column in ROW_COUNTS.items():
            graphs = graphs.append_column(column, pa.array([tables[name].num_rows], pa.int64()))
        try:
            return graphs.select(GRAPHS.names).cast(tagged("graphs"))
        except (KeyError, ValueError, pa.ArrowInvalid) as err:
            raise StoreError(f"graph {record.graph_id}: its graphs table does not match the store's schema ({err})"
                             ) from None

    def _temporary(self, path: str) -> str:
        """A unique temporary name beside `path` that directory scans skip ('.' prefix) and that says who wrote
        it (see remove_stale_temporaries)."""
        folder, name = path.rsplit("/", 1)
        return f"{folder}/.{name}.tmp-{PID_SPACE}-{os.getpid()}-{uuid.uuid4().hex}"

    def _write_file(self, name: str, table: pa.Table, path: str) -> None:
        self._write_pieces(name, [table], path)

    def _write_pieces(self, name: str, pieces: Iterable[pa.Table], path: str) -> int:
        """Write the concatenation of `pieces` to `path` atomically (a temporary file, then a move), in row
        groups of ROW_GROUP_ROWS; returns the rows written."""
        schema = tagged(name)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = self._temporary(path)
        written = 0
        try:
            with self.fs.open_output_stream(tmp) as sink, \
                    pq.ParquetWriter(sink, schema, compression="zstd") as writer:
                buffer: list[pa.Table] = []
                buffered = 0
                for piece in pieces:
                    buffer.append(piece.cast(schema))
                    buffered += piece.num_rows
                    if buffered >= ROW_GROUP_ROWS:
                        full = pa.concat_tables(buffer)
                        whole = full.num_rows - full.num_rows % ROW_GROUP_ROWS
                        writer.write_table(full.slice(0, whole), row_group_size=ROW_GROUP_ROWS)
                        written += whole
                        buffer, buffered = [full.slice(whole)], full.num_rows - whole
                rest = pa.concat_tables(buffer) if buffer else schema.empty_table()
                if rest.num_rows or not written:
                    writer.write_table(rest, row_group_size=ROW_GROUP_ROWS)
                    written += rest.num_rows
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise
        return written

    def write_failure(self, variant: str, failure_id: str, table: pa.Table) -> None:
        """Record (or replace) one failed prompt: a one-row `failures` file, written atomically."""
        variant, failure_id = check_variant(variant), check_id(failure_id, "failure id")
        self._sweep_once(variant)
        self._write_file("failures", table, self.path("failures", variant, failure_id))

    def _sweep_once(self, variant: str) -> None:
        if variant not in self._swept:
            self._swept.add(variant)
            self.remove_stale_temporaries(variant)

    def remove_stale_temporaries(self, variant: str, max_age_s: float = TMP_MAX_AGE_S) -> list[str]:
        """Delete the temporary files (`.*.parquet.tmp-*`, and older writers' `*.parquet.tmp-*`) that killed
        writers left in one variant's folders and pack folders: those older than `max_age_s`, and those whose
        writer ran in this pid space (host and pid namespace, named in the file) and has exited. Safe beside
        live writers here and on other nodes: a live writer's pid exists in its own pid space, a writer
        elsewhere is judged by age alone, and a write holds its temporary file for seconds (a pack's for as
        long as compaction writes it: under the hour for millions of rows). Returns the removed paths; each
        store does it on its first write to a variant."""
        removed = []
        now_ns = time.time_ns()
        for table in SCHEMAS:
            folder = self._folder(table, variant)
            for info in self._files(folder) + self._files(f"{folder}/packs"):
                match = _TMP.search(info.base_name)
                if not match:
                    continue
                old = info.mtime_ns is not None and now_ns - info.mtime_ns > max_age_s * 1e9
                exited = match["space"] == PID_SPACE and not _alive(int(match["pid"]))
                if old or exited:
                    try:
                        self.fs.delete_file(info.path)
                    except FileNotFoundError:  # another writer removed it first
                        continue
                    removed.append(info.path)
        return sorted(removed)

    def delete_failure(self, variant: str, failure_id: str) -> None:
        """Forget a recorded failure (absent is fine): the prompt is attributed again on the next run."""
        path = self.path("failures", check_variant(variant), check_id(failure_id, "failure id"))
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    def delete(self, graph_id: str, missing_ok: bool = False) -> None:
        """Remove a graph: a packed copy is hidden by a deletion mark, then its own commit record goes, then
        its own data files."""
        check_id(graph_id)
        try:
            variant = self._read_graph(graph_id, lambda where: where.variant)
        except GraphNotFoundError:
            if missing_ok:
                return
            raise
        pack = self._retrying(lambda: self._live_pack(variant))
        if pack is not None and graph_id in pack.row_of:
            with self.fs.open_output_stream(self._deletion_mark(variant, graph_id)):
                pass
        for name in reversed(WRITE_ORDER):
            try:
                self.fs.delete_file(self.path(name, variant, graph_id))
            except FileNotFoundError:
                pass
        self._variant_of.pop(graph_id, None)

    # -- compaction ----------------------------------------------------------------------------
    def compact(self, variant: str) -> dict:
        """Pack the variant's committed graphs into one file per table, so that listing and scanning them
        reads a few files instead of one per graph and table.

        The pack holds the previous pack's graphs (less those deleted or rewritten since) and then every
        graph with its own files, and is committed in one step (its graphs file, moved into place last);
        then the per-graph files, deletion marks and older packs are removed. Readers see every graph
        exactly once throughout; a crash leaves the old pack (before the commit) or the new one (after) with
        leftovers that the next compaction removes. It rewrites the variant's pack, so its cost grows with
        the variant: run it after a batch, not after each graph. Do not write to the variant meanwhile.
        Returns a summary: the pack, its graphs, how many came from their own files."""
        variant = check_variant(variant)
        self._sweep_once(variant)
        listing = self._retrying(lambda: self._list_variant(variant))
        old = listing.pack
        if not listing.commits and not listing.deleted:  # nothing to pack; leftovers of a stopped compaction go
            if old is not None:
                self._remove_compacted(listing, old.name, set(old.row_of))
            return {"variant": variant, "pack": old.name if old else None,
                    "graphs": old.graphs.num_rows if old else 0, "from_files": 0}
        try:
            ids = sorted(listing.commits)
            commits = dict(zip(ids, _map_threaded(functools.partial(self._read_commit, variant), ids)))
        except _Vanished as gone:
            raise StoreError(f"{gone.path} vanished while compacting variant {variant}: a writer is writing it; "
                             "compact when it is done") from None
        kept_rows = listing.pack_rows()
        parts = ([old.graphs.take(pa.array(kept_rows, pa.int64()))] if old is not None else []) + list(commits.values())
        graphs = pa.concat_tables(parts) if parts else tagged("graphs").empty_table()
        generation = int(_PACK.match(old.name)["generation"]) + 1 if old is not None else 1
        name = f"{generation:08d}-{uuid.uuid4().hex[:12]}"
        for table in DATA_TABLES:
            written = self._write_pieces(table, self._pack_pieces(table, listing, commits),
                                         self._pack_path(table, variant, name))
            expected = pc.sum(graphs[ROW_COUNTS[table]]).as_py() or 0
            if written != expected:
                raise StoreError(f"compacting variant {variant}: wrote {written} {table} rows, its graphs rows count "
                                 f"{expected}; the store was left as it was")
        self._write_file("graphs", graphs, self._pack_path("graphs", variant, name))  # the commit
        self._remove_compacted(listing, name, set(graphs["graph_id"].to_pylist()))
        return {"variant": variant, "pack": name, "graphs": graphs.num_rows, "from_files": len(commits)}

    def _pack_pieces(self, table: str, listing: _Listing, commits: dict[str, pa.Table]) -> Iterator[pa.Table]:
        """A table's rows for the new pack, in its graphs rows' order: the old pack's (less hidden graphs),
        then each graph's own file (checked against its commit row)."""
        old = listing.pack
        if old is not None and listing.pack_rows():
            hidden = pa.array(listing.hidden(), pa.string())
            parquet, _, _ = self._open_pack(old, table)
            for batch in parquet.iter_batches(batch_size=ROW_GROUP_ROWS):
                rows = pa.Table.from_batches([batch])
                yield rows.filter(pc.invert(pc.is_in(rows["graph_id"], value_set=hidden))) if len(hidden) else rows
        try:
            yield from _map_threaded(lambda item: self._read_located(_Where(listing.variant, *item, None), table),
                                     commits.items())
        except _Vanished as gone:
            raise StoreError(f"{gone.path} is missing: its graph is incomplete; rewrite or delete it before "
                             "compacting") from None

    def _remove_compacted(self, listing: _Listing, pack: str, packed: set[str]) -> None:
        """After a pack's commit: deletion marks, then the per-graph commits it copied (one rewritten meanwhile
        stays), then the data files of packed graphs that have no commit now, then every other pack (graphs
        file first). Each step leaves every graph readable once; a stop in between leaves leftovers that
        readers skip and the next compaction removes."""
        variant = listing.variant
        for graph_id in listing.deleted:
            self._delete_quietly(self._deletion_mark(variant, graph_id))
        for seen in listing.commits.values():
            now = self.fs.get_file_info(seen.path)
            if now.type == pafs.FileType.File and (now.mtime_ns, now.size) == (seen.mtime_ns, seen.size):
                self._delete_quietly(seen.path)
        committed = set(self._list_variant_commits(variant))
        for table in DATA_TABLES:
            for info in self._files(self._folder(table, variant)):
                stem = info.base_name[:-len(".parquet")]
                if info.base_name.endswith(".parquet") and stem in packed and stem not in committed:
                    self._delete_quietly(info.path)
        for table in reversed(WRITE_ORDER):
            for info in self._files(f"{self._folder(table, variant)}/packs"):
                stem = info.base_name[:-len(".parquet")]
                if info.base_name.endswith(".parquet") and _PACK.match(stem) and stem != pack:
                    self._delete_quietly(info.path)

    def _delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    # -- reading -------------------------------------------------------------------------------
    def variant_of(self, graph_id: str) -> str:
        """The variant of a committed graph, or GraphNotFoundError."""
        return self._read_graph(graph_id, lambda where: where.variant)

    def has_graph(self, variant: str, graph_id: str) -> bool:
        """True if the graph is committed (its own graphs row exists, or the pack's and no deletion mark)."""
        variant, graph_id = check_variant(variant), check_id(graph_id)

        def look() -> bool:
            if self._exists(self.path("graphs", variant, graph_id)):
                return True
            if self._exists(self._deletion_mark(variant, graph_id)):
                return False
            pack = self._live_pack(variant)
            return pack is not None and graph_id in pack.row_of

        return self._retrying(look)

    def has_failure(self, variant: str, failure_id: str) -> bool:
        return self._exists(self.path("failures", check_variant(variant), check_id(failure_id, "failure id")))

    def read_table(self, name: str, graph_id: str, columns: list[str] | None = None) -> pd.DataFrame:
        """One table of one graph as a DataFrame."""
        check_table(name)
        return self._read_graph(graph_id, lambda where: self._read_located(where, name, columns)).to_pandas()

    def list_graphs(self, variant: str | None = None) -> pd.DataFrame:
        """One row per committed graph (the graphs table), optionally of one variant; by variant, graph_id."""
        variants = [check_variant(variant)] if variant is not None else self.variants()
        frames = [t for t in (self._retrying(functools.partial(self._graph_rows, v)) for v in variants) if t.num_rows]
        if not frames:
            return SCHEMAS["graphs"].empty_table().to_pandas()
        return pa.concat_tables(frames).to_pandas()

    def _graph_rows(self, variant: str) -> pa.Table:
        listing = self._list_variant(variant)
        rows = list(_map_threaded(functools.partial(self._read_commit, variant), sorted(listing.commits)))
        if listing.pack is not None:
            rows.append(listing.pack.graphs.take(pa.array(listing.pack_rows(), pa.int64())))
        return pa.concat_tables(rows).sort_by("graph_id") if rows else GRAPHS.empty_table()

    def failures(self, variant: str | None = None) -> pd.DataFrame:
        """One row per prompt recorded as failed (the failures table), optionally of one variant."""
        variants = [check_variant(variant)] if variant is not None else self.variants("failures")
        frames = []
        for v in variants:
            for info in sorted(self._files(self._folder("failures", v)), key=lambda i: i.path):
                if info.base_name.endswith(".parquet"):
                    try:
                        frames.append(self._read(self._open("failures", info.path), info.path, lambda p: p.read()))
                    except _Vanished:  # deleted since the listing: no longer a failure
                        continue
        if not frames:
            return SCHEMAS["failures"].empty_table().to_pandas()
        return pa.concat_tables(frames).to_pandas()

    def dataset(self, table: str, variant: str | None = None) -> ds.Dataset:
        """A pyarrow dataset of one table over the committed graphs (of one variant, or all), for queries
        across graphs (DuckDB, polars, pyarrow: attribution/README.md). Its columns: the table's, `variant`
        (from the folder, for tables without one) and `pack` (the pack a row was read from, "" for a
        graph's own file). A graph committed after this call, or not yet committed, is not in it; each
        committed graph is in it once (a pack's copy that a graph's own files or a deletion override is
        filtered out). It names files: a compaction finishing later removes some, so make a new one then."""
        check_table(table)
        variants = [check_variant(variant)] if variant is not None else self.variants()
        schema = SCHEMAS[table]
        if "variant" not in schema.names:
            schema = schema.append(pa.field("variant", pa.string()))
        schema = schema.append(pa.field("pack", pa.string()))
        paths, guarantees, hidden = [], [], []
        for v in variants:
            listing = self._retrying(functools.partial(self._list_variant, v))
            own = pc.field("variant") == v
            for graph_id in sorted(listing.commits):
                paths.append(self.path(table, v, graph_id))
                guarantees.append(own & (pc.field("pack") == ""))
            if listing.pack is not None:
                name = listing.pack.name
                paths.append(self._pack_path(table, v, name))
                guarantees.append(own & (pc.field("pack") == name))
                if listing.hidden():
                    hidden.append(~(own & (pc.field("pack") == name) & pc.field("graph_id").isin(listing.hidden())))
        dataset = ds.FileSystemDataset.from_paths(paths, schema=schema, format=ds.ParquetFileFormat(),
                                                  filesystem=self.fs, partitions=guarantees)
        return dataset.filter(functools.reduce(operator.and_, hidden)) if hidden else dataset

    def graph_info(self, graph_id: str) -> pd.Series:
        return self.read_table("graphs", graph_id).iloc[0]

    def load_graph(self, graph_id: str) -> StoredGraph:
        """Every table of one graph, each checked against its graphs row (graph id and row count)."""
        tables = self._read_graph(graph_id, lambda where: {t: self._read_located(where, t).to_pandas() for t in TABLES})
        return StoredGraph(info=tables["graphs"].iloc[0], nodes=tables["nodes"], edges=tables["edges"],
                           head_loadings=tables["head_loadings"], qk_pairs=tables["qk_pairs"])

    def _node_ids(self, graph_id: str) -> pd.Series:
        return self._read_graph(graph_id, self._node_ids_of)

    def _node_ids_of(self, where: _Where) -> pd.Series:
        nodes = self._read_located(where, "nodes", columns=["node_index", "node_id"])
        return pd.Series(nodes["node_id"].to_numpy(), index=nodes["node_index"].to_numpy())

    @staticmethod
    def _with_node_ids(ids: pd.Series, edges: pd.DataFrame) -> pd.DataFrame:
        edges = edges.copy()
        edges.insert(1, "target_id", ids.reindex(edges["target"]).to_numpy())
        edges.insert(2, "source_id", ids.reindex(edges["source"]).to_numpy())
        return edges

    def top_edges(self, graph_id: str, k: int = 100, kept_only: bool = True) -> pd.DataFrame:
        """The k edges of largest |weight| (among those kept by pruning, unless kept_only=False), with
        node ids. Kept edges are stored first, by |weight|: from a graph's own file this reads only the
        first rows, from a pack only the graph's row groups."""

        def read(where: _Where) -> pd.DataFrame:
            if kept_only and where.pack is None:
                path = self.path("edges", where.variant, graph_id)
                parquet = self._open("edges", path)
                self._check_file(parquet, "edges", where, path)
                edges = self._read(parquet, path, functools.partial(self._first_kept_edges, k=k)).to_pandas()
            elif kept_only:
                table = self._read_located(where, "edges")
                edges = table.filter(table["kept"]).slice(0, k).to_pandas()
            else:
                edges = self._read_located(where, "edges").to_pandas()
                edges = edges.loc[edges["weight"].abs().sort_values(ascending=False, kind="stable").index[:k]]
                edges = edges.reset_index(drop=True)
            return self._with_node_ids(self._node_ids_of(where), edges)

        return self._read_graph(graph_id, read)

    @staticmethod
    def _first_kept_edges(parquet: pq.ParquetFile, k: int) -> pa.Table:
        """The first k kept edges of a graph's own edges file, reading no further than needed."""
        batches, found = [], 0
        for batch in parquet.iter_batches(batch_size=max(k, 1024)):
            kept = batch.column("kept")
            batches.append(batch.filter(kept))
            found += batches[-1].num_rows
            if found >= k or not kept[-1].as_py():  # enough, or the kept edges have ended
                break
        return pa.Table.from_batches(batches, schema=parquet.schema_arrow).slice(0, k)

    def _node_index(self, graph_id: str, node: str | int) -> int:
        if isinstance(node, numbers.Integral):
            return int(node)
        ids = self._node_ids(graph_id)
        matches = ids.index[ids.to_numpy() == node]
        if not len(matches):
            raise StoreError(f"graph {graph_id} has no node {node!r}")
        return int(matches[0])

    def edges_into(self, graph_id: str, node: str | int) -> pd.DataFrame:
        """Stored edges whose target is `node` (a node id or index), by |weight|."""
        index = self._node_index(graph_id, node)
        edges = self.read_table("edges", graph_id)
        return self._with_node_ids(self._node_ids(graph_id),
                                   edges[edges["target"] == index].reset_index(drop=True))

    def edges_out_of(self, graph_id: str, node: str | int) -> pd.DataFrame:
        """Stored edges whose source is `node` (a node id or index), by |weight|."""
        index = self._node_index(graph_id, node)
        edges = self.read_table("edges", graph_id)
        return self._with_node_ids(self._node_ids(graph_id),
                                   edges[edges["source"] == index].reset_index(drop=True))

    def heads_for_edge(self, graph_id: str, target: str | int, source: str | int) -> pd.DataFrame:
        """Head loadings of one edge: per carrying layer, the heads' parts and the residual part (-1)."""
        target, source = self._node_index(graph_id, target), self._node_index(graph_id, source)
        loadings = self.read_table("head_loadings", graph_id)
        rows = loadings[(loadings["target"] == target) & (loadings["source"] == source)]
        return rows.sort_values(["layer", "head"]).reset_index(drop=True)

    def qk_pairs(self, graph_id: str, layer: int, head: int, query_pos: int, key_pos: int) -> pd.DataFrame:
        """The QK attribution of one attention edge (layer, head, query, key)."""
        pairs = self.read_table("qk_pairs", graph_id)
        rows = pairs[(pairs["layer"] == layer) & (pairs["head"] == head) & (pairs["query_pos"] == query_pos)
                     & (pairs["key_pos"] == key_pos)]
        return rows.reset_index(drop=True)

    def qk_pairs_for_edge(self, graph_id: str, target: str | int, source: str | int) -> pd.DataFrame:
        """The QK attributions behind a graph edge: of each attention edge its head loadings point at."""
        heads = self.heads_for_edge(graph_id, target, source)
        heads = heads[heads["head"] >= 0][["layer", "head", "query_pos", "key_pos"]].drop_duplicates()
        pairs = self.read_table("qk_pairs", graph_id)
        return pairs.merge(heads, on=["layer", "head", "query_pos", "key_pos"]).reset_index(drop=True)


def open_store(uri: str | Path, filesystem: pafs.FileSystem | None = None) -> GraphStore:
    """Open (or create on first write) the store at a local path or pyarrow filesystem URI."""
    return GraphStore(uri, filesystem)
