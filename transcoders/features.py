"""Feature dashboards: what each CLT feature responds to (held-out text) and what it writes (weights alone).

Activation side, `scan_activations`: one ordered pass over held-out token blocks (the CLT stage's data
config, held-out split). The MLP inputs come from the harvesting hooks (`harvest_batch`, position 0
dropped as in training), the encoder gives the activations, layer by layer. Per feature it keeps the
number of active tokens and their activation sum, the `top_k` activating tokens (value, location and
the feature's activations over a `window` of tokens around it) and a uniform random sample of
`n_random * random_pool` active tokens (the smallest of a random key per active token). Both are kept
by a batched merge (`merge_top`: sort the kept entries and the batch's active entries per feature,
keep the first k), never by storing all activations. Ties go to the earlier token. The state is saved
atomically every `checkpoint_tokens`; a rerun continues from the saved block and, since the random
keys are seeded by (seed, block, layer), gives exactly the result of an uninterrupted pass.

Weight side, `weight_evidence`: the tokens a feature's decoder promotes and suppresses through the
unembedding (the sum of its decoder rows over the layers it writes to, times the final norm weight,
times W_U), and the input tokens whose embeddings excite its encoder most. Both are direct-path
approximations, see the function docstrings.

Stored beside the CLT in `features/`: `features.parquet` (one row per feature), `feature_examples.parquet`
(one row per context) and `features.json`, written last: a directory without it is unfinished.
`open_features(clt_dir)` reads them back.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.files import write_atomic, write_json_atomic
from sparse_attention.hook_points import hf_model, module
from transcoders.clt import CrossLayerTranscoder
from transcoders.config import FeaturesConfig
from transcoders.harvest import harvest_batch

FEATURES_DIR = "features"
FEATURES_FILE = "features.parquet"
EXAMPLES_FILE = "feature_examples.parquet"
META_FILE = "features.json"  # written last: the commit record
STATE_FILE = "scan_state.pt"  # the resumable scan; removed once the tables are written
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


def window_split(window: int) -> tuple[int, int]:
    """(tokens before, tokens after) the activating token in a context of `window` tokens."""
    after = window // 4
    return window - 1 - after, after


# --- the streaming pass -----------------------------------------------------------------------------


def merge_top(key: torch.Tensor, loc: torch.Tensor, new_feature: torch.Tensor, new_key: torch.Tensor,
              new_loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per feature, the k largest keys among the kept entries and the new ones.

    key, loc: [F, k] kept entries, sorted by key descending (empty slots: key -inf); new_*: [M] entries of
    feature new_feature, in location order. Ties go to the kept entry, then to the earlier new entry, so
    with locations increasing along the stream a tie always goes to the earlier token.
    Returns (key [F, k], loc [F, k], source [F, k]): source < F * k indexes the kept entries (flattened),
    source - F * k the new ones.
    """
    F, k = key.shape
    entering = (new_key > key[new_feature, -1]).nonzero().flatten()  # the rest lose to the k-th kept entry
    cand_feature = torch.cat([torch.arange(F).repeat_interleave(k), new_feature[entering]])
    cand_key = torch.cat([key.flatten(), new_key[entering]])
    order = torch.argsort(cand_key, descending=True, stable=True)
    order = order[torch.argsort(cand_feature[order], stable=True)]  # grouped by feature, key descending inside
    counts = torch.bincount(cand_feature, minlength=F)  # >= k each: every feature has k kept slots
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order)) - starts.repeat_interleave(counts)
    chosen = order[rank < k].view(F, k)  # into the candidates
    source = torch.cat([torch.arange(F * k), F * k + entering])[chosen]
    return cand_key[chosen], torch.cat([loc.flatten(), new_loc[entering]])[chosen], source


@dataclass
class ScanState:
    """Everything the pass keeps, per layer; `loc` = block * context_length + position (-1: empty)."""

    blocks_done: int
    tokens_done: int
    count: torch.Tensor  # [L, F] int64 active tokens
    act_sum: torch.Tensor  # [L, F] float64
    top_act: torch.Tensor  # [L, F, k] descending, -inf empty
    top_loc: torch.Tensor  # [L, F, k] int64
    top_window: torch.Tensor  # [L, F, k, W] the feature's activations around the token (NaN outside the block)
    pool_key: torch.Tensor  # [L, F, P] minus the random key (larger = kept), -inf empty
    pool_loc: torch.Tensor  # [L, F, P]
    pool_act: torch.Tensor  # [L, F, P]
    pool_window: torch.Tensor  # [L, F, P, W]

    @classmethod
    def empty(cls, n_layers: int, n_features: int, top_k: int, pool: int, window: int) -> ScanState:
        L, F = n_layers, n_features
        return cls(0, 0, torch.zeros(L, F, dtype=torch.int64), torch.zeros(L, F, dtype=torch.float64),
                   torch.full((L, F, top_k), -math.inf), torch.full((L, F, top_k), -1, dtype=torch.int64),
                   torch.full((L, F, top_k, window), math.nan),
                   torch.full((L, F, pool), -math.inf), torch.full((L, F, pool), -1, dtype=torch.int64),
                   torch.full((L, F, pool), math.nan), torch.full((L, F, pool, window), math.nan))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> 1)


def _merge_with_windows(key, loc, window, act, new_feature, new_key, new_loc, new_act, new_windows):
    """merge_top, carrying the activation and window of each entry; `new_windows(index)` builds new ones."""
    F, k = key.shape
    key_out, loc_out, source = merge_top(key, loc, new_feature, new_key, new_loc)
    source = source.flatten()
    kept = source < F * k
    new = source[~kept] - F * k
    window_out = torch.empty(F * k, window.shape[-1])
    window_out[kept] = window.reshape(F * k, -1)[source[kept]]
    window_out[~kept] = new_windows(new)
    act_out = torch.cat([act.flatten(), new_act])[source].view(F, k)
    return key_out, loc_out, act_out, window_out.view(F, k, -1)


def update_layer(state: ScanState, layer: int, acts: torch.Tensor, first_block: int, context_length: int,
                 window: int, seed: int) -> None:
    """Fold one batch of one layer's activations [blocks, positions 1.., F] into `state`."""
    B, T1, F = acts.shape
    flat = acts.reshape(-1, F)
    token, feature = flat.nonzero(as_tuple=True)  # row-major: in token order
    value = flat[token, feature]
    state.count[layer] += torch.bincount(feature, minlength=F)
    state.act_sum[layer].index_add_(0, feature, value.double())
    block, position = token // T1, token % T1 + 1
    loc = (first_block + block) * context_length + position
    before, after = window_split(window)
    padded = functional.pad(acts, (0, 0, before, after), value=math.nan)  # [B, before + T1 + after, F]
    offsets = torch.arange(window)

    def windows(index: torch.Tensor) -> torch.Tensor:  # [n] new entries -> [n, W]
        rows = (position[index] - 1)[:, None] + offsets
        return padded[block[index, None], rows, feature[index, None]]

    _, state.top_loc[layer], state.top_act[layer], state.top_window[layer] = _merge_with_windows(
        state.top_act[layer], state.top_loc[layer], state.top_window[layer], state.top_act[layer],
        feature, value, loc, value, windows)
    if not state.pool_key.shape[-1]:  # n_random = 0
        return
    random_key = -torch.rand(len(value), generator=torch.Generator().manual_seed(_seed(seed, first_block, layer)))
    state.pool_key[layer], state.pool_loc[layer], state.pool_act[layer], state.pool_window[layer] = (
        _merge_with_windows(state.pool_key[layer], state.pool_loc[layer], state.pool_window[layer],
                            state.pool_act[layer], feature, random_key, loc, value, windows))


def blocks_to_scan(blocks: torch.Tensor, tokens: int) -> int:
    """How many held-out blocks hold `tokens` scanned tokens (position 0 is not scanned), at most all."""
    return min(len(blocks), math.ceil(tokens / (blocks.shape[1] - 1)))


@torch.no_grad()
def scan_activations(model: nn.Module, clt: CrossLayerTranscoder, blocks: torch.Tensor, config: FeaturesConfig,
                     *, state_path: Path | None = None, fingerprint: str = "", progress: bool = True) -> ScanState:
    """The streaming pass over `blocks` [n, context_length] (see the module docstring); resumes from `state_path`."""
    context_length = blocks.shape[1]
    n_blocks = blocks_to_scan(blocks, config.tokens)
    saved = load_checkpoint(state_path, fingerprint, what="feature scan") if state_path is not None else None
    if saved is not None:
        state = ScanState(**{f.name: saved[f.name] for f in fields(ScanState)})
    else:
        state = ScanState.empty(clt.n_layers, clt.n_features, config.top_k, config.n_random * config.random_pool,
                                config.window)
    total = n_blocks * (context_length - 1)
    bar = tqdm(total=total, initial=state.tokens_done, desc="features", unit="tok", disable=not progress,
               dynamic_ncols=True)
    for start in range(state.blocks_done, n_blocks, config.batch_size):
        batch = blocks[start: min(start + config.batch_size, n_blocks)]
        mlp_in, _ = harvest_batch(model, batch)  # [B * (T - 1), L, D]
        mlp_in = mlp_in.view(len(batch), context_length - 1, clt.n_layers, clt.d_model)
        for layer in range(clt.n_layers):
            acts = clt.encode_layer(layer, mlp_in[:, :, layer])  # [B, T - 1, F]
            update_layer(state, layer, acts, start, context_length, config.window, config.seed)
        before = state.tokens_done
        state.blocks_done = start + len(batch)
        state.tokens_done += mlp_in.shape[0] * mlp_in.shape[1]
        bar.update(state.tokens_done - before)
        crossed = state.tokens_done // config.checkpoint_tokens > before // config.checkpoint_tokens
        if state_path is not None and (crossed or state.blocks_done == n_blocks):
            save_checkpoint(state_path, {"fingerprint": fingerprint, "step": state.blocks_done, **state.to_dict()})
    bar.close()
    return state


# --- evidence from the weights ----------------------------------------------------------------------


def _top_columns(rows: torch.Tensor, columns: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each column of scores = rows @ columns.T ([V, c]), the row indices of its n largest and n smallest
    scores, computed in feature chunks of at most ~64 MB. rows [V, D], columns [c, D] -> ([c, n], [c, n])."""
    chunk = max(1, 2**24 // len(rows))
    n = min(n, len(rows))
    largest, smallest = [], []
    for part in columns.split(chunk):
        scores = rows @ part.T
        largest.append(torch.topk(scores, n, dim=0).indices.T)
        smallest.append(torch.topk(scores, n, dim=0, largest=False).indices.T)
    return torch.cat(largest), torch.cat(smallest)


@torch.no_grad()
def weight_evidence(model: nn.Module, clt: CrossLayerTranscoder, n: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """Token ids per feature from the weights alone, each [L, F, n]:

    - promoted / suppressed: the largest / smallest entries of W_U (g_final * sum_t W_dec[l][f, t]), the
      feature's total direct write into the residual stream read by the unembedding. This is the direct
      path only: it ignores what later layers do with the write and the final norm's division by the
      residual's RMS (a positive scale per token position, which does not change the ranking).
    - input: the largest pre-activations W_enc[l][f] . (g_l * e / rms(e)) + b_enc over token embeddings e,
      where g_l is layer l's MLP-input (post-attention) RMSNorm weight: as if the residual stream at
      layer l's MLP were the token's embedding alone (no attention, no earlier layers). For layer 0 with
      little attention output this is close to the truth; for later layers it is a rough direct-path guess.
    Only token ids below `vocab_size` (the tokenizer's) are considered.
    """
    unembed = hf_model(model).get_output_embeddings().weight[:vocab_size].float()  # [V, D]
    embed = module(model, "embed").weight[:vocab_size].float()
    final_gain = module(model, "ln_final").weight.float()
    L = clt.n_layers
    promoted, suppressed, inputs = [], [], []
    for layer in range(L):
        decoder = (clt.W_dec[layer] * clt.output_scale[layer:, None]).sum(1)  # [F, D] real units
        written = decoder * final_gain
        most, least = _top_columns(unembed, written, n)
        promoted.append(most)
        suppressed.append(least)
        norm = module(model, f"blocks.{layer}.ln2")  # the norm in front of the MLP, whose output the CLT reads
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
        normed = embed * torch.rsqrt(embed.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.float()
        encoder = clt.W_enc[layer] / clt.input_scale[layer]  # b_enc shifts every token alike: not needed to rank
        inputs.append(_top_columns(normed, encoder, n)[0])
    return {"promoted": torch.stack(promoted), "suppressed": torch.stack(suppressed), "input": torch.stack(inputs)}


# --- labels and tables ------------------------------------------------------------------------------


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def auto_label(activating: list[str], promoted: list[str], inputs: list[str]) -> str:
    """A short label from the evidence: the dominant activating token of the top contexts (or the three
    most common ones when none has half), then the two most promoted tokens. A feature that never fired
    is labelled by its input tokens. Made by rule, not by reading: label_source "auto"."""
    if activating:
        common = Counter(activating).most_common(3)
        head = _quote(common[0][0]) if 2 * common[0][1] >= len(activating) else " | ".join(
            _quote(token) for token, _ in common)
    else:
        head = "inactive; reads " + " | ".join(_quote(token) for token in inputs[:2])
    return f"{head} → {', '.join(_quote(token) for token in promoted[:2])}"


class _TokenStrings:
    """Token id -> its decoded string, decoded once per id."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, ids) -> list[str]:
        out = []
        for token in ids:
            token = int(token)
            if token not in self.cache:
                self.cache[token] = self.tokenizer.decode([token])
            out.append(self.cache[token])
        return out


def _spread_ranks(pool_key: torch.Tensor, pool_act: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From each feature's random sample [.., P], n entries at evenly spaced activation ranks (lowest to
    highest). Returns (indices into the pool [.., n], valid [.., n]); duplicates (small samples) invalid."""
    valid_count = (pool_key > -math.inf).sum(-1, keepdim=True)  # [.., 1]
    by_act = torch.argsort(torch.where(pool_key > -math.inf, pool_act, -math.inf), dim=-1, stable=True)
    P = pool_key.shape[-1]
    steps = torch.arange(n, dtype=torch.float64) / max(n - 1, 1) if n > 1 else torch.full((1,), 0.5, dtype=torch.float64)
    ranks = torch.round(steps * (valid_count - 1).clamp(min=0)).long()  # [.., n]
    valid = (valid_count > 0) & torch.cat([torch.ones_like(ranks[..., :1], dtype=torch.bool),
                                           ranks[..., 1:] != ranks[..., :-1]], dim=-1)
    index = torch.gather(by_act, -1, (P - valid_count + ranks).clamp(0, P - 1))
    return index, valid


def _example_rows(kind: str, loc: torch.Tensor, act: torch.Tensor, window: torch.Tensor, valid: torch.Tensor,
                  blocks: torch.Tensor, before: int, strings: _TokenStrings) -> pa.Table:
    """Rows of the examples table for the entries `valid` [L, F, n] of loc/act [L, F, n] and window [L, F, n, W]."""
    L, F, n = valid.shape
    layer, feature, rank = valid.nonzero(as_tuple=True)
    loc, act, window = loc[valid], act[valid], window[valid]
    T = blocks.shape[1]
    block, position = loc // T, loc % T
    columns = (position - before)[:, None] + torch.arange(window.shape[-1])  # [R, W]
    inside = ~torch.isnan(window)
    tokens = blocks[block[:, None], columns.clamp(0, T - 1)]
    offsets = pa.array(np.concatenate([[0], np.cumsum(inside.sum(1).numpy())]).astype(np.int32))
    flat_tokens = tokens[inside].numpy().astype(np.int32)
    first_inside = inside.int().argmax(1)
    return pa.table({
        "layer": layer.numpy().astype(np.int32), "feature": feature.numpy().astype(np.int32),
        "kind": pa.array([kind] * len(layer), pa.string()), "rank": rank.numpy().astype(np.int32),
        "activation": act.numpy().astype(np.float32), "block": block.numpy().astype(np.int32),
        "position": position.numpy().astype(np.int32),
        "window_index": (before - first_inside).numpy().astype(np.int32),
        "tokens": pa.ListArray.from_arrays(offsets, pa.array(flat_tokens)),
        "token_strings": pa.ListArray.from_arrays(offsets, pa.array(strings(flat_tokens), pa.string())),
        "activations": pa.ListArray.from_arrays(offsets, pa.array(window[inside].numpy().astype(np.float32))),
    }, schema=EXAMPLES_SCHEMA)


def dashboard_tables(state: ScanState, evidence: dict[str, torch.Tensor], blocks: torch.Tensor, tokenizer,
                     config: FeaturesConfig) -> tuple[pa.Table, pa.Table]:
    """(features, feature_examples) Arrow tables from a finished scan and the weight evidence."""
    strings = _TokenStrings(tokenizer)
    before, _ = window_split(config.window)
    top_valid = state.top_act > -math.inf
    examples = [_example_rows("top", state.top_loc, state.top_act, state.top_window, top_valid, blocks, before,
                              strings)]
    if config.n_random:
        index, valid = _spread_ranks(state.pool_key, state.pool_act, config.n_random)
        window = torch.gather(state.pool_window, 2, index[..., None].expand(-1, -1, -1, config.window))
        examples.append(_example_rows("random", torch.gather(state.pool_loc, 2, index),
                                      torch.gather(state.pool_act, 2, index), window, valid, blocks, before, strings))
    examples = pa.concat_tables(examples).sort_by([("layer", "ascending"), ("feature", "ascending"),
                                                   ("kind", "descending"), ("rank", "ascending")])
    L, F = state.count.shape
    T = blocks.shape[1]
    top_loc = state.top_loc.clamp(min=0)
    activating = blocks[top_loc // T, top_loc % T]  # [L, F, k] token at each top context's maximum
    lists = {name: evidence[name].tolist() for name in ("promoted", "suppressed", "input")}
    activating_list, valid_list = activating.tolist(), top_valid.tolist()
    rows = {name: [] for name in ("label", "promoted_tokens", "suppressed_tokens", "input_tokens")}
    for layer in range(L):
        for feature in range(F):
            promoted = strings(lists["promoted"][layer][feature])
            inputs = strings(lists["input"][layer][feature])
            fired = [t for t, ok in zip(activating_list[layer][feature], valid_list[layer][feature]) if ok]
            rows["label"].append(auto_label(strings(fired), promoted, inputs))
            rows["promoted_tokens"].append(promoted)
            rows["suppressed_tokens"].append(strings(lists["suppressed"][layer][feature]))
            rows["input_tokens"].append(inputs)
    count = state.count.flatten()
    mean = (state.act_sum.flatten() / count.clamp(min=1)).float()
    features = pa.table({
        "layer": np.repeat(np.arange(L, dtype=np.int32), F), "feature": np.tile(np.arange(F, dtype=np.int32), L),
        "density": (count.double() / max(state.tokens_done, 1)).numpy(), "n_active": count.numpy(),
        "mean_activation": pa.array(mean.numpy(), mask=(count == 0).numpy()),
        "max_activation": state.top_act[..., 0].clamp(min=0).flatten().numpy(),
        "label": rows["label"], "label_source": [LABEL_SOURCE_AUTO] * (L * F),
        "promoted_tokens": rows["promoted_tokens"], "promoted_token_ids": evidence["promoted"].flatten(0, 1).tolist(),
        "suppressed_tokens": rows["suppressed_tokens"],
        "suppressed_token_ids": evidence["suppressed"].flatten(0, 1).tolist(),
        "input_tokens": rows["input_tokens"], "input_token_ids": evidence["input"].flatten(0, 1).tolist(),
    }, schema=FEATURES_SCHEMA)
    return features, examples


# --- writing and reading ----------------------------------------------------------------------------


def _write_parquet(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=65536))


def scan_fingerprint(config: FeaturesConfig, blocks: torch.Tensor, identity: str) -> str:
    """Hash of what changes the dashboards: the config (not its checkpoint interval), the scanned blocks, the CLT."""
    n_blocks = blocks_to_scan(blocks, config.tokens)
    payload = json.dumps({"config": config.model_dump(mode="json", exclude={"checkpoint_tokens", "enabled"}),
                          "blocks": hashlib.sha256(blocks[:n_blocks].numpy().tobytes()).hexdigest(),
                          "identity": identity, "format_version": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_dashboards(model: nn.Module, clt: CrossLayerTranscoder, tokenizer, blocks: torch.Tensor,
                     config: FeaturesConfig, clt_dir: str | Path, *, identity: str = "", progress: bool = True
                     ) -> dict:
    """Scan `blocks` (held-out), add the weight evidence and labels, write `clt_dir/features/`; returns a summary.

    `identity` names the CLT and model (the stage passes a hash of clt.json): dashboards with the same
    fingerprint are kept as they are, a saved scan of another fingerprint is refused.
    """
    directory = Path(clt_dir) / FEATURES_DIR
    directory.mkdir(parents=True, exist_ok=True)
    fingerprint = scan_fingerprint(config, blocks, identity)
    meta_path = directory / META_FILE
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("fingerprint") == fingerprint:
            return meta
        meta_path.unlink()  # uncommit: the tables below are about to change
    started = time.perf_counter()
    state = scan_activations(model, clt, blocks, config, state_path=directory / STATE_FILE,
                             fingerprint=fingerprint, progress=progress)
    scan_seconds = time.perf_counter() - started
    evidence = weight_evidence(model, clt, config.n_tokens_listed, len(tokenizer))
    features, examples = dashboard_tables(state, evidence, blocks, tokenizer, config)
    count = state.count
    meta = {"fingerprint": fingerprint, "tokens_scanned": state.tokens_done,
            "blocks_scanned": state.blocks_done, "context_length": int(blocks.shape[1]),
            "n_layers": int(count.shape[0]), "n_features": int(count.shape[1]),
            "n_examples": examples.num_rows, "never_active_fraction": float((count == 0).float().mean()),
            "scan_seconds": scan_seconds, "seconds": time.perf_counter() - started,
            "config": config.model_dump(mode="json")}
    meta = write_dashboards(clt_dir, features, examples, meta)
    (directory / STATE_FILE).unlink(missing_ok=True)
    return meta


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
