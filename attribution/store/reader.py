"""Finding and reading the committed graphs of a store, checked against their commit rows.

A graph's one-row `graphs` file is its commit. Readers list a variant's per-graph `graphs` folder
(commits and deletion marks) first and its packs second; a per-graph commit wins over the pack's copy (it
is the same graph or a newer rewrite), a deletion mark hides it, and a file that vanishes mid-read (a
compaction has just finished) makes the reader look again. So every reader, during a compaction too, sees
each committed graph exactly once. Each read checks the files against the graph's commit row: graph_id and
row count of every table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution.schema import DATA_TABLES, ROW_COUNTS
from attribution.store.files import DELETED, PACK, StoreFiles, Vanished
from attribution.store.ids import ID, GraphNotFoundError, StoreError, check_id

READ_ATTEMPTS = 4  # a reader looks again this often when files vanish under it (a compaction finishing)

T = TypeVar("T")


@dataclass
class Pack:
    """A committed pack of one variant: its graphs rows in pack order, and where each graph's rows start."""

    variant: str
    name: str
    graphs: pa.Table
    row_of: dict[str, int]  # graph_id -> its row in `graphs`
    starts: dict[str, np.ndarray]  # table -> first row of each graph in the table's pack file, then the total
    files: dict[str, tuple[pq.FileMetaData, np.ndarray]] = field(default_factory=dict)  # opened: metadata, row-group starts


@dataclass
class Listing:
    """One variant's commits at one moment: per-graph commit files, deletion marks and the live pack."""

    variant: str
    commits: dict[str, pafs.FileInfo]  # graph_id -> its per-graph graphs file
    deleted: set[str]  # packed graphs deleted since the pack was made
    pack: Pack | None

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
class Where:
    """Where one committed graph is read from: its own files (pack None) or a pack."""

    variant: str
    graph_id: str
    info: pa.Table  # its one-row graphs record
    pack: Pack | None

    def rows(self, table: str) -> int:
        return self.info[ROW_COUNTS[table]][0].as_py()


class StoreReader:
    """Lists, locates and reads committed graphs; remembers each graph's variant and each variant's pack."""

    def __init__(self, files: StoreFiles):
        self.files = files
        self.variant_of: dict[str, str] = {}
        self._packs: dict[str, Pack] = {}  # variant -> its live pack as last read (pack files never change)

    def retrying(self, read: Callable[[], T]) -> T:
        """Run `read`, again if a file vanished under it; a file still missing then is missing."""
        for _ in range(READ_ATTEMPTS):
            try:
                return read()
            except Vanished as gone:
                missing = gone.path
        raise StoreError(f"{missing} is missing: the store is incomplete; rewrite the graph")

    def read_commit(self, variant: str, graph_id: str) -> pa.Table:
        """A per-graph commit row, checked: one row, this graph and variant, row counts present."""
        path = self.files.path("graphs", variant, graph_id)
        info = self.files.read(self.files.open("graphs", path), path, lambda p: p.read())
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

    # -- listing -------------------------------------------------------------------------------
    def live_pack(self, variant: str) -> Pack | None:
        """The variant's committed pack of the highest generation (its graphs file exists), or None."""
        folder = f"{self.files.folder('graphs', variant)}/packs"
        names = sorted(i.base_name[:-len(".parquet")] for i in self.files.files(folder)
                       if i.base_name.endswith(".parquet") and PACK.match(i.base_name[:-len(".parquet")]))
        if not names:
            return None
        cached = self._packs.get(variant)
        if cached is not None and cached.name == names[-1]:
            return cached
        pack = self._load_pack(variant, names[-1])
        self._packs[variant] = pack
        return pack

    def _load_pack(self, variant: str, name: str) -> Pack:
        path = self.files.pack_path("graphs", variant, name)
        graphs = self.files.read(self.files.open("graphs", path), path, lambda p: p.read())
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
        return Pack(variant, name, graphs, {g: row for row, g in enumerate(ids)}, starts)

    def list_variant(self, variant: str) -> Listing:
        """Per-graph commits and deletion marks first, the live pack second (the order readers rely on)."""
        commits, deleted = {}, set()
        for info in self.files.files(self.files.folder("graphs", variant)):
            name = info.base_name
            if name.endswith(".parquet") and ID.match(name[:-len(".parquet")]):
                commits[name[:-len(".parquet")]] = info
            elif match := DELETED.match(name):
                deleted.add(match["graph_id"])
        return Listing(variant, commits, deleted, self.live_pack(variant))

    def list_variant_commits(self, variant: str) -> list[str]:
        return [i.base_name[:-len(".parquet")] for i in self.files.files(self.files.folder("graphs", variant))
                if i.base_name.endswith(".parquet") and ID.match(i.base_name[:-len(".parquet")])]

    # -- locating ------------------------------------------------------------------------------
    def _locate_in(self, variant: str, graph_id: str) -> Where | None:
        """The graph in this variant: its own commit first, then (unless marked deleted) the live pack."""
        try:
            return Where(variant, graph_id, self.read_commit(variant, graph_id), None)
        except Vanished:
            pass
        if self.files.exists(self.files.deletion_mark(variant, graph_id)):
            return None
        pack = self.live_pack(variant)
        if pack is None or graph_id not in pack.row_of:
            return None
        return Where(variant, graph_id, pack.graphs.slice(pack.row_of[graph_id], 1), pack)

    def _locate(self, graph_id: str) -> Where:
        check_id(graph_id)
        cached = self.variant_of.get(graph_id)
        where = self._locate_in(cached, graph_id) if cached is not None else None
        for variant in self.files.variants() if where is None else []:
            if variant != cached and (where := self._locate_in(variant, graph_id)) is not None:
                break
        if where is None:
            raise GraphNotFoundError(f"graph {graph_id} is not in the store at {self.files.root}; list_graphs() "
                                     "shows what is")
        self.variant_of[graph_id] = where.variant
        return where

    def read_graph(self, graph_id: str, read: Callable[[Where], T]) -> T:
        """`read` on the located graph, located again if its files vanish under it."""
        return self.retrying(lambda: read(self._locate(graph_id)))

    # -- reading a located graph ---------------------------------------------------------------
    def check_file(self, parquet: pq.ParquetFile, table: str, where: Where, path: str) -> None:
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
                graph_ids = self.files.read(parquet, path, lambda p: p.read(columns=["graph_id"]))["graph_id"]
                return set(pc.unique(graph_ids).to_pylist())
            ids.update((stats.min, stats.max))
        return ids

    def open_pack(self, pack: Pack, table: str) -> tuple[pq.ParquetFile, np.ndarray, str]:
        """One table's pack file (checked once: our schema, the rows its graphs rows count), its row-group
        starts and its path."""
        path = self.files.pack_path(table, pack.variant, pack.name)
        metadata, group_starts = pack.files.get(table, (None, None))
        parquet = self.files.open(table, path, metadata)
        if metadata is None:
            metadata = parquet.metadata
            if metadata.num_rows != pack.starts[table][-1]:
                raise StoreError(f"the {table} pack {path} has {metadata.num_rows} rows, its graphs rows count "
                                 f"{pack.starts[table][-1]}: the pack is damaged; delete the variant's packs")
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            group_starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
            pack.files[table] = (metadata, group_starts)
        return parquet, group_starts, path

    def read_located(self, where: Where, table: str, columns: list[str] | None = None) -> pa.Table:
        """One table of a located graph, checked against its commit row."""
        if table == "graphs":
            return where.info if columns is None else where.info.select(columns)
        if where.pack is None:
            path = self.files.path(table, where.variant, where.graph_id)
            parquet = self.files.open(table, path)
            self.check_file(parquet, table, where, path)
            return self.files.read(parquet, path, lambda p: p.read(columns=columns))
        pack, row = where.pack, where.pack.row_of[where.graph_id]
        start, stop = int(pack.starts[table][row]), int(pack.starts[table][row + 1])
        parquet, group_starts, path = self.open_pack(pack, table)
        wanted = columns if columns is None or "graph_id" in columns else [*columns, "graph_id"]
        first = int(np.searchsorted(group_starts, start, side="right")) - 1
        last = int(np.searchsorted(group_starts, stop, side="left"))
        groups = list(range(first, last)) if stop > start else []
        rows = self.files.read(parquet, path, lambda p: p.read_row_groups(groups, columns=wanted))
        rows = rows.slice(start - int(group_starts[first]), stop - start) if groups else rows.slice(0, 0)
        wrong = pc.not_equal(rows["graph_id"], pa.scalar(where.graph_id)) if rows.num_rows else None
        if rows.num_rows != stop - start or (wrong is not None and pc.any(pc.fill_null(wrong, True)).as_py()):
            raise StoreError(f"graph {where.graph_id}: rows {start}-{stop} of its {table} pack {path} are not all "
                             "its own: the pack is damaged; delete the variant's packs and attribute again")
        return rows if columns is None or "graph_id" in columns else rows.drop_columns(["graph_id"])
