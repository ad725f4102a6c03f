"""Feature dashboards, built: the scan (`feature_scan`), the weight evidence and labels (`feature_labels`),
turned into the two tables of `features` and written beside the CLT.

`build_dashboards` keeps dashboards whose fingerprint (config, scanned blocks, CLT) is unchanged, resumes
a killed scan from its saved state, and writes the tables, then the commit record.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from transcoders.clt import CrossLayerTranscoder
from transcoders.config import FeaturesConfig
from transcoders.feature_labels import auto_label, weight_evidence
from transcoders.feature_scan import ScanState, blocks_to_scan, scan_activations, window_split
from transcoders.features import (
    EXAMPLES_SCHEMA,
    FEATURES_DIR,
    FEATURES_SCHEMA,
    FORMAT_VERSION,
    LABEL_SOURCE_AUTO,
    META_FILE,
    write_dashboards,
)

STATE_FILE = "scan_state.pt"  # the resumable scan; removed once the tables are written


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
            "precision": config.precision, "scan_seconds": scan_seconds, "seconds": time.perf_counter() - started,
            "config": config.model_dump(mode="json")}
    meta = write_dashboards(clt_dir, features, examples, meta)
    (directory / STATE_FILE).unlink(missing_ok=True)
    return meta
