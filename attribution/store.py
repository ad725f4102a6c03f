"""The attribution store: write graphs atomically, read them back as pandas DataFrames.

Layout and tables: see attribution/schema.py. A store lives on a local path or any pyarrow
filesystem URI (file://, s3://, gs://, hdfs://...). Each file is written under a temporary name and
moved into place; the one-row `graphs` file is written last and removed first, so a reader sees a
graph whole or not at all. A writer killed mid-file leaves its temporary file, which reads ignore and
the next writer of that variant removes (`remove_stale_temporaries`).
"""

from __future__ import annotations

import hashlib
import numbers
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution.records import GraphRecord
from attribution.replacement import AttributionError
from attribution.schema import SCHEMAS, TABLES, WRITE_ORDER, check_schema, tagged

_VARIANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_GRAPH_ID = re.compile(r"^[A-Za-z0-9_-]+$")
ROW_GROUP_ROWS = 32768
TMP_MAX_AGE_S = 3600.0  # a write holds its temporary file for seconds: one this old was abandoned
_TMP = re.compile(r"\.parquet\.tmp-(?:(?P<space>[0-9a-f]{12})-(?P<pid>\d+)-)?[0-9a-f]{32}$")


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


class StoreError(AttributionError):
    """A store, file or graph that cannot be read or written; the message says which and why."""


class GraphNotFoundError(StoreError, KeyError):
    """No committed graph with this id in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


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
        raise StoreError(f"variant {variant!r} must be letters, digits, '_', '.', '-' (it names a directory)")
    return variant


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
        self._swept: set[str] = set()  # variants whose stale temporary files this store removed

    def __repr__(self) -> str:
        return f"GraphStore({self.fs.type_name}:{self.root})"

    # -- paths ---------------------------------------------------------------------------------
    def path(self, table: str, variant: str, graph_id: str) -> str:
        return f"{self.root}/{table}/variant={variant}/{graph_id}.parquet"

    def variants(self, table: str = "graphs") -> list[str]:
        """Variants that have a folder in `table` (for graphs: at least one committed graph)."""
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{table}", allow_not_found=True))
        return sorted(i.base_name.split("=", 1)[1] for i in infos
                      if i.type == pafs.FileType.Directory and i.base_name.startswith("variant="))

    def variant_of(self, graph_id: str) -> str:
        """The variant of a committed graph, or GraphNotFoundError."""
        if not isinstance(graph_id, str) or not _GRAPH_ID.match(graph_id):
            raise GraphNotFoundError(f"{graph_id!r} is not a graph id")
        cached = self._variant_of.get(graph_id)
        if cached is not None and self._exists(self.path("graphs", cached, graph_id)):
            return cached
        for variant in self.variants():
            if self._exists(self.path("graphs", variant, graph_id)):
                self._variant_of[graph_id] = variant
                return variant
        raise GraphNotFoundError(f"graph {graph_id} is not in the store at {self.root}; list_graphs() shows what is")

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def has_graph(self, variant: str, graph_id: str) -> bool:
        """True if the graph is committed (its graphs row exists)."""
        return self._exists(self.path("graphs", check_variant(variant), graph_id))

    def has_failure(self, variant: str, failure_id: str) -> bool:
        return self._exists(self.path("failures", check_variant(variant), failure_id))

    # -- writing -------------------------------------------------------------------------------
    def write(self, record: GraphRecord) -> None:
        """Write (or replace) one graph; readers see the old graph, no graph, or the new one whole."""
        variant = check_variant(record.variant)
        if not _GRAPH_ID.match(record.graph_id):
            raise StoreError(f"graph id {record.graph_id!r} must be letters, digits, '_' or '-'")
        missing = set(TABLES) - set(record.tables)
        if missing:
            raise StoreError(f"graph {record.graph_id} lacks tables {sorted(missing)}")
        self._sweep_once(variant)
        self.delete(record.graph_id, missing_ok=True)  # uncommit first: no reader mixes old and new files
        for name in WRITE_ORDER:
            self._write_file(name, record.tables[name], self.path(name, variant, record.graph_id))
        self._variant_of[record.graph_id] = variant

    def _write_file(self, name: str, table: pa.Table, path: str) -> None:
        table = table.cast(tagged(name))
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        tmp = f"{path}.tmp-{PID_SPACE}-{os.getpid()}-{uuid.uuid4().hex}"  # who wrote it: see remove_stale_temporaries
        try:
            with self.fs.open_output_stream(tmp) as sink:
                pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS, compression="zstd")
            self.fs.move(tmp, path)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (FileNotFoundError, OSError):
                pass
            raise

    def write_failure(self, variant: str, failure_id: str, table: pa.Table) -> None:
        """Record (or replace) one failed prompt: a one-row `failures` file, written atomically."""
        variant = check_variant(variant)
        if not _GRAPH_ID.match(failure_id):
            raise StoreError(f"failure id {failure_id!r} must be letters, digits, '_' or '-'")
        self._sweep_once(variant)
        self._write_file("failures", table, self.path("failures", variant, failure_id))

    def _sweep_once(self, variant: str) -> None:
        if variant not in self._swept:
            self._swept.add(variant)
            self.remove_stale_temporaries(variant)

    def remove_stale_temporaries(self, variant: str, max_age_s: float = TMP_MAX_AGE_S) -> list[str]:
        """Delete the temporary files (`*.parquet.tmp-*`) that killed writers left in one variant's folders:
        those older than `max_age_s`, and those whose writer ran in this pid space (host and pid namespace,
        named in the file) and has exited. Safe beside live writers here and on other nodes: a live writer's
        pid exists in its own pid space, a writer elsewhere is judged by age alone, and a write holds its
        temporary file for seconds. Returns the removed paths; each store does it on its first write to a
        variant."""
        removed = []
        now_ns = time.time_ns()
        for table in TABLES:
            selector = pafs.FileSelector(f"{self.root}/{table}/variant={check_variant(variant)}", allow_not_found=True)
            for info in self.fs.get_file_info(selector):
                match = _TMP.search(info.base_name)
                if info.type != pafs.FileType.File or not match:
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
        try:
            self.fs.delete_file(self.path("failures", check_variant(variant), failure_id))
        except FileNotFoundError:
            pass

    def delete(self, graph_id: str, missing_ok: bool = False) -> None:
        """Remove a graph: its commit record first, then its data files."""
        try:
            variant = self.variant_of(graph_id)
        except GraphNotFoundError:
            if missing_ok:
                return
            raise
        for name in reversed(WRITE_ORDER):
            try:
                self.fs.delete_file(self.path(name, variant, graph_id))
            except FileNotFoundError:
                pass
        self._variant_of.pop(graph_id, None)

    # -- reading -------------------------------------------------------------------------------
    def _open(self, name: str, path: str) -> pq.ParquetFile:
        """Open one of our Parquet files, checking it is the table it should be."""
        try:
            parquet = pq.ParquetFile(self.fs.open_input_file(path))
        except FileNotFoundError:
            raise StoreError(f"{path} is missing: the store is incomplete; rewrite the graph") from None
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"{path} is corrupted or not a Parquet file ({err}); delete it and rewrite the graph"
                             ) from None
        problem = check_schema(name, parquet.schema_arrow, path)
        if problem:
            raise StoreError(problem)
        return parquet

    def read_table(self, name: str, graph_id: str, columns: list[str] | None = None) -> pd.DataFrame:
        """One table of one graph as a DataFrame."""
        if name not in TABLES:
            raise StoreError(f"unknown table {name!r}; tables are {list(TABLES)}")
        parquet = self._open(name, self.path(name, self.variant_of(graph_id), graph_id))
        try:
            return parquet.read(columns=columns).to_pandas()
        except (pa.ArrowInvalid, OSError) as err:
            raise StoreError(f"graph {graph_id}: table {name} is corrupted ({err})") from None

    def list_graphs(self, variant: str | None = None) -> pd.DataFrame:
        """One row per committed graph (the graphs table), optionally of one variant."""
        return self._read_rows("graphs", variant)

    def failures(self, variant: str | None = None) -> pd.DataFrame:
        """One row per prompt recorded as failed (the failures table), optionally of one variant."""
        return self._read_rows("failures", variant)

    def _read_rows(self, table: str, variant: str | None) -> pd.DataFrame:
        """Every file of a one-row-per-file table (graphs, failures) of one or all variants, concatenated."""
        variants = [check_variant(variant)] if variant is not None else self.variants(table)
        frames = []
        for v in variants:
            selector = pafs.FileSelector(f"{self.root}/{table}/variant={v}", allow_not_found=True)
            for info in sorted(self.fs.get_file_info(selector), key=lambda i: i.path):
                if info.base_name.endswith(".parquet"):
                    frames.append(self._open(table, info.path).read())
        if not frames:
            return SCHEMAS[table].empty_table().to_pandas()
        return pa.concat_tables(frames).to_pandas()

    def graph_info(self, graph_id: str) -> pd.Series:
        return self.read_table("graphs", graph_id).iloc[0]

    def load_graph(self, graph_id: str) -> StoredGraph:
        """Every table of one graph."""
        return StoredGraph(
            info=self.graph_info(graph_id),
            nodes=self.read_table("nodes", graph_id),
            edges=self.read_table("edges", graph_id),
            head_loadings=self.read_table("head_loadings", graph_id),
            qk_pairs=self.read_table("qk_pairs", graph_id),
        )

    def _node_ids(self, graph_id: str) -> pd.Series:
        nodes = self.read_table("nodes", graph_id, columns=["node_index", "node_id"])
        return pd.Series(nodes["node_id"].to_numpy(), index=nodes["node_index"].to_numpy())

    def _with_node_ids(self, graph_id: str, edges: pd.DataFrame) -> pd.DataFrame:
        ids = self._node_ids(graph_id)
        edges = edges.copy()
        edges.insert(1, "target_id", ids.reindex(edges["target"]).to_numpy())
        edges.insert(2, "source_id", ids.reindex(edges["source"]).to_numpy())
        return edges

    def top_edges(self, graph_id: str, k: int = 100, kept_only: bool = True) -> pd.DataFrame:
        """The k edges of largest |weight| (among those kept by pruning, unless kept_only=False), with
        node ids. Kept edges are stored first, by |weight|: this reads only the first rows."""
        parquet = self._open("edges", self.path("edges", self.variant_of(graph_id), graph_id))
        if kept_only:
            batches, found = [], 0
            for batch in parquet.iter_batches(batch_size=max(k, 1024)):
                kept = batch.column("kept")
                batches.append(batch.filter(kept))
                found += batches[-1].num_rows
                if found >= k or not kept[-1].as_py():  # enough, or the kept edges have ended
                    break
            table = pa.Table.from_batches(batches, schema=parquet.schema_arrow).slice(0, k)
            edges = table.to_pandas()
        else:
            edges = parquet.read().to_pandas()
            edges = edges.loc[edges["weight"].abs().sort_values(ascending=False, kind="stable").index[:k]]
            edges = edges.reset_index(drop=True)
        return self._with_node_ids(graph_id, edges)

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
        return self._with_node_ids(graph_id, edges[edges["target"] == index].reset_index(drop=True))

    def edges_out_of(self, graph_id: str, node: str | int) -> pd.DataFrame:
        """Stored edges whose source is `node` (a node id or index), by |weight|."""
        index = self._node_index(graph_id, node)
        edges = self.read_table("edges", graph_id)
        return self._with_node_ids(graph_id, edges[edges["source"] == index].reset_index(drop=True))

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
