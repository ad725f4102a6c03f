"""The Parquet schema of the attribution store: five tables keyed by graph_id, one place.

Layout under the store root, grouped by model variant: one file per graph and table, and after
`GraphStore.compact` one pack per table holding many graphs (store/reader.py says who reads which):

    {table}/variant={variant}/{graph_id}.parquet             table in TABLES
    {table}/variant={variant}/packs/{pack}.parquet           pack = "{generation:08d}-{token}"
    graphs/variant={variant}/_{graph_id}.deleted             a packed graph deleted since (empty file)

Temporary files start with '.' and deletion marks with '_', so pyarrow's, pandas' and DuckDB's default
directory discovery skips them.

- graphs: one row per graph (prompt, its task and index, tokens, model, CLT, settings, sizes, scores, and
  `rows_{table}`: how many rows the graph has in each other table, set by the store on write and checked on
  every read). It is the commit record: written last, removed first, so a graph is visible exactly when its
  row exists. In a pack, graphs rows are in pack order: each other table of the pack holds the graphs' rows
  in that order, so `rows_{table}` also says where each graph's rows start.
- nodes: one row per node in circuit-tracer's order (node_index); node ids `{layer}_{feature}_{pos}`,
  errors `{layer}_-1_{pos}`, tokens `E_{token}_{pos}`, logits `{n_layers + 1}_{token}_{pos}`.
- edges: (target, source) node indices and weight (rows = targets); the edges kept by pruning come
  first, each part sorted by |weight| descending, so the top-k kept edges are the first rows.
- head_loadings: per kept edge and carrying layer, one row per head with a nonzero part (head >= 0,
  with the query/key positions that carry most of it) and one residual row (head -1); the rows of one
  (edge, layer) sum to the edge weight.
- qk_pairs: per attention edge (layer, head, query_pos, key_pos), the gate logit split into
  (query component, key component) pairs: kinds `pair` + `pair_rest` + `offset` sum to the logit, and so
  do `query_marginal` + `query_marginal_rest` + `offset`, and `key_marginal` + `key_marginal_rest` + `offset`.
  With an attention soft-cap (graphs `attn_logit_softcap`, Gemma-2) the pairs (and each side's marginals) sum
  to the pre-cap score s, and gate_logit = cap * tanh(s / cap) + offset.
- graphs `final_logit_softcap` (Gemma-2): logit nodes' values and incoming edges are for the pre-cap logit z
  (linear in the final residual); `logit_probs` come from the model's output cap * tanh(z / cap), monotone in z.

Beside them, one table that is not part of any graph (never packed):

    failures/variant={variant}/{failure_id}.parquet

- failures: one row per prompt the stage could not attribute (empty, longer than the context, bad
  tokens: an AttributionError), with the error's type and message. `failure_id` is the graph_id the
  prompt would have had, so a rerun with the same model, CLT and settings skips it (unless forced) and
  a later success removes it.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 4  # 3: graphs rows record each table's row count (rows_{table}); 4: and the model's soft-caps
SCHEMA_KEY = b"sparse_attention_interp.attribution"  # Parquet metadata key: "{table}:{version}"

GRAPHS = pa.schema([
    ("graph_id", pa.string()),
    ("variant", pa.string()),
    ("prompt", pa.string()),
    ("task", pa.string()),  # prompt set (prompts/data/{task}.jsonl) or "custom"
    ("prompt_index", pa.int32()),  # line of the prompt in its set (or in the free prompt list)
    ("tokens", pa.list_(pa.int32())),
    ("token_strings", pa.list_(pa.string())),
    ("model", pa.string()),
    ("clt", pa.string()),
    ("settings", pa.string()),  # JSON of the attribution config
    ("n_layers", pa.int32()),
    ("n_pos", pa.int32()),
    ("n_active_features", pa.int32()),
    ("n_selected_features", pa.int32()),
    ("n_logits", pa.int32()),
    ("n_nodes", pa.int32()),
    ("n_edges", pa.int64()),  # nonzero edges before pruning
    ("n_nodes_kept", pa.int32()),
    ("n_edges_kept", pa.int64()),
    ("edges_stored", pa.string()),  # "pruned" or "all"
    ("logit_tokens", pa.list_(pa.int32())),
    ("logit_probs", pa.list_(pa.float32())),  # from the model's output logits (soft-capped where it caps them)
    ("attn_logit_softcap", pa.float64()),  # attention soft-cap (Gemma-2): gate logit = cap * tanh(score / cap) + b;
    # null without one
    ("final_logit_softcap", pa.float64()),  # final-logit soft-cap: logit nodes are pre-cap logits z; null without
    ("replacement_score", pa.float64()),
    ("completeness_score", pa.float64()),
    ("pruned_replacement_score", pa.float64()),
    ("pruned_completeness_score", pa.float64()),
    ("seconds", pa.float64()),
    ("created", pa.timestamp("ms", tz="UTC")),
    ("rows_nodes", pa.int64()),  # the graph's rows in each other table: set by the store, checked on read
    ("rows_edges", pa.int64()),
    ("rows_head_loadings", pa.int64()),
    ("rows_qk_pairs", pa.int64()),
])

NODES = pa.schema([
    ("graph_id", pa.string()),
    ("node_index", pa.int32()),
    ("node_id", pa.string()),
    ("kind", pa.string()),  # feature | error | token | logit
    ("layer", pa.int32()),  # -1 for tokens, n_layers + 1 for logits
    ("pos", pa.int32()),
    ("feature", pa.int32()),  # feature id; token id for tokens and logits; -1 for errors
    ("activation", pa.float32()),  # features only
    ("value", pa.float32()),  # pre-activation (features), demeaned pre-cap logit (logits)
    ("constant", pa.float32()),  # the part of value due to no node (b_enc, b_dec, BOS-position MLP)
    ("token_prob", pa.float32()),  # logits only
    ("influence", pa.float32()),
    ("cumulative_influence", pa.float32()),
    ("kept", pa.bool_()),
])

EDGES = pa.schema([
    ("graph_id", pa.string()),
    ("target", pa.int32()),
    ("source", pa.int32()),
    ("weight", pa.float32()),
    ("kept", pa.bool_()),
])

HEAD_LOADINGS = pa.schema([
    ("graph_id", pa.string()),
    ("target", pa.int32()),
    ("source", pa.int32()),
    ("layer", pa.int32()),
    ("head", pa.int32()),  # -1: the part that skips this layer's attention
    ("weight", pa.float32()),
    ("query_pos", pa.int32()),  # the (query, key) pair carrying most of the head's part; -1 for heads -1 and -2
    ("key_pos", pa.int32()),
    ("pair_share", pa.float32()),  # that pair's share of the head's part; null for heads -1 and -2
])

QK_PAIRS = pa.schema([
    ("graph_id", pa.string()),
    ("layer", pa.int32()),
    ("head", pa.int32()),
    ("query_pos", pa.int32()),
    ("key_pos", pa.int32()),
    ("kind", pa.string()),  # pair | pair_rest | offset | query_marginal(_rest) | key_marginal(_rest)
    ("query_component", pa.string()),  # component id, "*" for all / the rest
    ("key_component", pa.string()),
    ("value", pa.float32()),
    ("gate_logit", pa.float32()),
])

FAILURES = pa.schema([
    ("failure_id", pa.string()),  # the graph_id the prompt would have had
    ("variant", pa.string()),
    ("prompt", pa.string()),
    ("task", pa.string()),
    ("prompt_index", pa.int32()),
    ("error_type", pa.string()),  # e.g. PromptTooLongError
    ("message", pa.string()),
    ("created", pa.timestamp("ms", tz="UTC")),
])

TABLES: dict[str, pa.Schema] = {
    "graphs": GRAPHS,
    "nodes": NODES,
    "edges": EDGES,
    "head_loadings": HEAD_LOADINGS,
    "qk_pairs": QK_PAIRS,
}
DATA_TABLES = ("nodes", "edges", "head_loadings", "qk_pairs")  # a graph's tables besides its graphs row
ROW_COUNTS = {name: f"rows_{name}" for name in DATA_TABLES}  # graphs column: the graph's rows in that table
WRITE_ORDER = (*DATA_TABLES, "graphs")  # graphs last: the commit
SCHEMAS: dict[str, pa.Schema] = {**TABLES, "failures": FAILURES}  # every file the store writes


def tagged(table_name: str) -> pa.Schema:
    """The table's schema with the metadata that marks a file as ours."""
    return SCHEMAS[table_name].with_metadata({SCHEMA_KEY: f"{table_name}:{SCHEMA_VERSION}".encode()})


def check_schema(table_name: str, schema: pa.Schema, where: str) -> str | None:
    """None if `schema` (read from `where`) is our `table_name` at this version, else what is wrong."""
    tag = (schema.metadata or {}).get(SCHEMA_KEY)
    if tag is None:
        return f"{where} is not an attribution-store file (no {SCHEMA_KEY.decode()} metadata)"
    if tag.decode() != f"{table_name}:{SCHEMA_VERSION}":
        name, _, version = tag.decode().partition(":")
        if name == table_name and version.isdigit() and int(version) < SCHEMA_VERSION:
            return (f"{where} was written by an older attribution store (schema {version}, this code reads "
                    f"{SCHEMA_VERSION}); attribute into a new store, or rerun with --force attribution")
        return f"{where} holds {tag.decode()!r}, expected {table_name}:{SCHEMA_VERSION}"
    expected = SCHEMAS[table_name]
    if not schema.remove_metadata().equals(expected):
        return f"{where} has columns {schema.names}, expected {expected.names}"
    return None
