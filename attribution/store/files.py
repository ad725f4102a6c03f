"""The store's files on a pyarrow filesystem: where each lives, opening and reading one, writing one
atomically, and removing the temporaries that killed writers leave.

Paths: `{root}/{table}/variant={variant}/{graph_id}.parquet` per graph, `.../packs/{pack}.parquet` per
pack, `{root}/graphs/variant={variant}/_{graph_id}.deleted` for a deletion mark (tables: attribution/schema.py).

Each file is written under a temporary name (starting with '.', so directory scans skip it) and moved into
place. A writer killed mid-file leaves its temporary file, which reads ignore and the next writer of that
variant removes (`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution.schema import SCHEMAS, check_schema, tagged
from attribution.store.ids import VARIANT, StoreError, check_id, check_table, check_variant

PACK = re.compile(r"^(?P<generation>\d{8})-[0-9a-f]{12}$")
DELETED = re.compile(r"^_(?P<graph_id>[A-Za-z0-9][A-Za-z0-9_-]{0,127})\.deleted$")
ROW_GROUP_ROWS = 32768
READ_THREADS = 8  # files read at once when a listing or a compaction reads one file per graph
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


def map_threaded(read: Callable[[S], T], items: Iterable[S], window: int = 1024) -> Iterator[T]:
    """`read` of each item in order, READ_THREADS at a time (file reads wait on I/O, not the GIL), at most
    `window` results ahead of the consumer."""
    items = list(items)
    if len(items) < 2:
        yield from map(read, items)
        return
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for start in range(0, len(items), window):
            yield from pool.map(read, items[start:start + window])


def float_columns(schema: pa.Schema) -> list[str]:
    """Columns written without a dictionary (nearly every float is distinct: a dictionary only adds its
    indices) and with their bytes split into streams (exponents apart from mantissas: zstd packs them better)."""
    return [f.name for f in schema if pa.types.is_floating(f.type)]


class Vanished(Exception):
    """A file named a moment ago is gone (a compaction or a rewrite finished): look again."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


class StoreFiles:
    """The files of one store: paths, listing, checked opening and reading, atomic writes, temporaries."""

    def __init__(self, fs: pafs.FileSystem, root: str):
        self.fs, self.root = fs, root
        self._swept: set[str] = set()  # variants whose stale temporary files this store removed

    # -- paths ---------------------------------------------------------------------------------
    def path(self, table: str, variant: str, graph_id: str) -> str:
        """The per-graph file of one table (or the failures file of `graph_id` for table "failures")."""
        check_table(table, SCHEMAS)
        return f"{self.folder(table, variant)}/{check_id(graph_id)}.parquet"

    def folder(self, table: str, variant: str) -> str:
        return f"{self.root}/{table}/variant={check_variant(variant)}"

    def pack_path(self, table: str, variant: str, pack: str) -> str:
        return f"{self.folder(table, variant)}/packs/{pack}.parquet"

    def deletion_mark(self, variant: str, graph_id: str) -> str:
        return f"{self.folder('graphs', variant)}/_{check_id(graph_id)}.deleted"

    def variants(self, table: str = "graphs") -> list[str]:
        """Variants that have a folder in `table` (for graphs: at least one committed graph)."""
        check_table(table, SCHEMAS)
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True))
        names = (i.base_name.split("=", 1)[1] for i in infos
                 if i.type == pafs.FileType.Directory and i.base_name.startswith("variant="))
        return sorted(v for v in names if VARIANT.match(v))

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def files(self, folder: str) -> list[pafs.FileInfo]:
        infos = self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        return [i for i in infos if i.type == pafs.FileType.File]

    # -- reading -------------------------------------------------------------------------------
    def open(self, name: str, path: str, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
        """Open one of our Parquet files, checking it is the table it should be."""
        try:
            parquet = pq.ParquetFile(self.fs.open_input_file(path), metadata=metadata)
        except FileNotFoundError:
            raise Vanished(path) from None
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"{path} is corrupted or not a Parquet file ({err}); delete it and rewrite the graph"
                             ) from None
        problem = check_schema(name, parquet.schema_arrow, path)
        if problem:
            raise StoreError(problem)
        return parquet

    @staticmethod
    def read(parquet: pq.ParquetFile, path: str, read: Callable[[pq.ParquetFile], T]) -> T:
        try:
            return read(parquet)
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"{path} is corrupted ({err}); delete it and rewrite the graph") from None

    # -- writing and removing ------------------------------------------------------------------
    def temporary(self, path: str) -> str:
        """A unique temporary name beside `path` that directory scans skip ('.' prefix) and that says who wrote
        it (see remove_stale_temporaries)."""
        folder, name = path.rsplit("/", 1)
        return f"{folder}/.{name}.tmp-{PID_SPACE}-{os.getpid()}-{uuid.uuid4().hex}"

    def write_file(self, name: str, table: pa.Table, path: str) -> None:
        self.write_pieces(name, [table], path)

    def write_pieces(self, name: str, pieces: Iterable[pa.Table], path: str) -> int:
        """Write the concatenation of `pieces` to `path` atomically (a temporary file, then a move), in row
        groups of ROW_GROUP_ROWS; returns the rows written."""
        schema = tagged(name)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = self.temporary(path)
        written = 0
        try:
            with self.fs.open_output_stream(tmp) as sink, \
                    pq.ParquetWriter(sink, schema, compression="zstd", use_byte_stream_split=float_columns(schema),
                                     use_dictionary=[f.name for f in schema if f.name not in float_columns(schema)]
                                     ) as writer:
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

    def delete_quietly(self, path: str) -> None:
        """Delete a file; one already gone is fine."""
        try:
            self.fs.delete_file(path)
        except FileNotFoundError:
            pass

    # -- temporaries of killed writers ---------------------------------------------------------
    def sweep_once(self, variant: str) -> None:
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
            folder = self.folder(table, variant)
            for info in self.files(folder) + self.files(f"{folder}/packs"):
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
