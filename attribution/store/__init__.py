"""The attribution store: graphs written atomically, read back as pandas DataFrames or a pyarrow dataset.

Layout and tables: see attribution/schema.py. A store lives on a local path or any pyarrow filesystem
URI (file://, s3://, gs://, hdfs://...). Modules, one concern each:
- `ids`: the errors and the checks of variants, ids and table names (they name directories and files);
- `files`: paths, checked opening and reading, atomic writes, temporaries of killed writers;
- `reader`: listing a variant's commits and packs, locating a graph, reading it checked against its commit;
- `packs`: compaction into one pack per table, committed in one step;
- `graph_store`: `GraphStore`, the public API, composing the rest.
"""

from attribution.store.files import PID_SPACE
from attribution.store.graph_store import GraphStore, StoredGraph, open_store
from attribution.store.ids import GraphNotFoundError, StoreError, check_id, check_table, check_variant

__all__ = ["PID_SPACE", "GraphNotFoundError", "GraphStore", "StoreError", "StoredGraph", "check_id", "check_table",
           "check_variant", "open_store"]
