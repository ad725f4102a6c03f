"""GraphStore: write graphs atomically, read them back as pandas DataFrames or a pyarrow dataset.

Commits. A graph's one-row `graphs` file is its commit: written last, removed first, so a reader sees a
graph whole or not at all (each file is written atomically: attribution/store/files.py). Readers:
attribution/store/reader.py; compaction into packs: attribution/store/packs.py.
"""

from __future__ import annotations

import functools
import numbers
import operator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from attribution.records import GraphRecord
from attribution.schema import DATA_TABLES, GRAPHS, ROW_COUNTS, SCHEMAS, TABLES, WRITE_ORDER, tagged
from attribution.store import packs
from attribution.store.files import TMP_MAX_AGE_S, StoreFiles, Vanished, map_threaded
from attribution.store.ids import GraphNotFoundError, StoreError, check_id, check_table, check_variant
from attribution.store.reader import StoreReader, Where


@dataclass
class StoredGraph:
    """One graph read back from the store."""

    info: pd.Series  # the graphs row
    nodes: pd.DataFrame
    edges: pd.DataFrame
    head_loadings: pd.DataFrame
    qk_pairs: pd.DataFrame


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
        self._files = StoreFiles(self.fs, self.root)
        self._reader = StoreReader(self._files)

    def __repr__(self) -> str:
        return f"GraphStore({self.fs.type_name}:{self.root})"

    def path(self, table: str, variant: str, graph_id: str) -> str:
        """The per-graph file of one table (or the failures file of `graph_id` for table "failures")."""
        return self._files.path(table, variant, graph_id)

    def variants(self, table: str = "graphs") -> list[str]:
        """Variants that have a folder in `table` (for graphs: at least one committed graph)."""
        return self._files.variants(table)

    # -- writing -------------------------------------------------------------------------------
    def write(self, record: GraphRecord) -> None:
        """Write (or replace) one graph; readers see the old graph, no graph, or the new one whole."""
        variant, graph_id = check_variant(record.variant), check_id(record.graph_id)
        missing = set(TABLES) - set(record.tables)
        if missing:
            raise StoreError(f"graph {graph_id} lacks tables {sorted(missing)}")
        tables = {name: self._record_table(record, name) for name in DATA_TABLES}
        tables["graphs"] = self._commit_row(record, tables)
        self._files.sweep_once(variant)
        self.delete(graph_id, missing_ok=True)  # uncommit first: no reader mixes old and new files
        for name in WRITE_ORDER:
            self._files.write_file(name, tables[name], self.path(name, variant, graph_id))
        self._reader.variant_of[graph_id] = variant

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

    def write_failure(self, variant: str, failure_id: str, table: pa.Table) -> None:
        """Record (or replace) one failed prompt: a one-row `failures` file, written atomically."""
        variant, failure_id = check_variant(variant), check_id(failure_id, "failure id")
        self._files.sweep_once(variant)
        self._files.write_file("failures", table, self.path("failures", variant, failure_id))

    def remove_stale_temporaries(self, variant: str, max_age_s: float = TMP_MAX_AGE_S) -> list[str]:
        """Delete the temporary files that killed writers left in one variant's folders (StoreFiles'
        remove_stale_temporaries says which are safe to remove); returns the removed paths."""
        return self._files.remove_stale_temporaries(variant, max_age_s)

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
            variant = self._reader.read_graph(graph_id, lambda where: where.variant)
        except GraphNotFoundError:
            if missing_ok:
                return
            raise
        pack = self._reader.retrying(lambda: self._reader.live_pack(variant))
        if pack is not None and graph_id in pack.row_of:
            with self.fs.open_output_stream(self._files.deletion_mark(variant, graph_id)):
                pass
        for name in reversed(WRITE_ORDER):
            try:
                self.fs.delete_file(self.path(name, variant, graph_id))
            except FileNotFoundError:
                pass
        self._reader.variant_of.pop(graph_id, None)

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
        return packs.compact(self._reader, variant)

    # -- reading -------------------------------------------------------------------------------
    def variant_of(self, graph_id: str) -> str:
        """The variant of a committed graph, or GraphNotFoundError."""
        return self._reader.read_graph(graph_id, lambda where: where.variant)

    def has_graph(self, variant: str, graph_id: str) -> bool:
        """True if the graph is committed (its own graphs row exists, or the pack's and no deletion mark)."""
        variant, graph_id = check_variant(variant), check_id(graph_id)

        def look() -> bool:
            if self._files.exists(self.path("graphs", variant, graph_id)):
                return True
            if self._files.exists(self._files.deletion_mark(variant, graph_id)):
                return False
            pack = self._reader.live_pack(variant)
            return pack is not None and graph_id in pack.row_of

        return self._reader.retrying(look)

    def has_failure(self, variant: str, failure_id: str) -> bool:
        return self._files.exists(self.path("failures", check_variant(variant), check_id(failure_id, "failure id")))

    def read_table(self, name: str, graph_id: str, columns: list[str] | None = None) -> pd.DataFrame:
        """One table of one graph as a DataFrame."""
        check_table(name)
        return self._reader.read_graph(graph_id, lambda where: self._reader.read_located(where, name, columns)).to_pandas()

    def list_graphs(self, variant: str | None = None) -> pd.DataFrame:
        """One row per committed graph (the graphs table), optionally of one variant; by variant, graph_id."""
        variants = [check_variant(variant)] if variant is not None else self.variants()
        frames = [t for t in (self._reader.retrying(functools.partial(self._graph_rows, v)) for v in variants) if t.num_rows]
        if not frames:
            return SCHEMAS["graphs"].empty_table().to_pandas()
        return pa.concat_tables(frames).to_pandas()

    def _graph_rows(self, variant: str) -> pa.Table:
        listing = self._reader.list_variant(variant)
        rows = list(map_threaded(functools.partial(self._reader.read_commit, variant), sorted(listing.commits)))
        if listing.pack is not None:
            rows.append(listing.pack.graphs.take(pa.array(listing.pack_rows(), pa.int64())))
        return pa.concat_tables(rows).sort_by("graph_id") if rows else GRAPHS.empty_table()

    def failures(self, variant: str | None = None) -> pd.DataFrame:
        """One row per prompt recorded as failed (the failures table), optionally of one variant."""
        variants = [check_variant(variant)] if variant is not None else self.variants("failures")
        frames = []
        for v in variants:
            for info in sorted(self._files.files(self._files.folder("failures", v)), key=lambda i: i.path):
                if info.base_name.endswith(".parquet"):
                    try:
                        frames.append(self._files.read(self._files.open("failures", info.path), info.path, lambda p: p.read()))
                    except Vanished:  # deleted since the listing: no longer a failure
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
            listing = self._reader.retrying(functools.partial(self._reader.list_variant, v))
            own = pc.field("variant") == v
            for graph_id in sorted(listing.commits):
                paths.append(self.path(table, v, graph_id))
                guarantees.append(own & (pc.field("pack") == ""))
            if listing.pack is not None:
                name = listing.pack.name
                paths.append(self._files.pack_path(table, v, name))
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
        tables = self._reader.read_graph(graph_id, lambda where: {t: self._reader.read_located(where, t).to_pandas() for t in TABLES})
        return StoredGraph(info=tables["graphs"].iloc[0], nodes=tables["nodes"], edges=tables["edges"],
                           head_loadings=tables["head_loadings"], qk_pairs=tables["qk_pairs"])

    def _node_ids(self, graph_id: str) -> pd.Series:
        return self._reader.read_graph(graph_id, self._node_ids_of)

    def _node_ids_of(self, where: Where) -> pd.Series:
        nodes = self._reader.read_located(where, "nodes", columns=["node_index", "node_id"])
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

        def read(where: Where) -> pd.DataFrame:
            if kept_only and where.pack is None:
                path = self.path("edges", where.variant, graph_id)
                parquet = self._files.open("edges", path)
                self._reader.check_file(parquet, "edges", where, path)
                edges = self._files.read(parquet, path, functools.partial(self._first_kept_edges, k=k)).to_pandas()
            elif kept_only:
                table = self._reader.read_located(where, "edges")
                edges = table.filter(table["kept"]).slice(0, k).to_pandas()
            else:
                edges = self._reader.read_located(where, "edges").to_pandas()
                edges = edges.loc[edges["weight"].abs().sort_values(ascending=False, kind="stable").index[:k]]
                edges = edges.reset_index(drop=True)
            return self._with_node_ids(self._node_ids_of(where), edges)

        return self._reader.read_graph(graph_id, read)

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
