"""The streaming pass of the feature dashboards: what each CLT feature responds to on held-out text.

`scan_activations` makes one ordered pass over held-out token blocks (the CLT stage's data config,
held-out split). The MLP inputs come from the harvesting hooks (`harvest_batch`, position 0 dropped as
in training), the encoder gives the activations, layer by layer. Per feature it keeps the number of
active tokens and their activation sum, the `top_k` activating tokens (value, location and the
feature's activations over a `window` of tokens around it) and a uniform random sample of
`n_random * random_pool` active tokens (the smallest of a random key per active token). Both are kept
by a batched merge (`merge_top`: sort the kept entries and the batch's active entries per feature,
keep the first k), never by storing all activations. Ties go to the earlier token. The state is saved
atomically every `checkpoint_tokens`; a rerun continues from the saved block and, since the random
keys are seeded by (seed, block, layer), gives exactly the result of an uninterrupted pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from tqdm.auto import tqdm

from runtime.checkpoint import load_checkpoint, save_checkpoint
from runtime.precision import autocast, check_precision, frozen_copy
from transcoders.clt import CrossLayerTranscoder
from transcoders.config import FeaturesConfig
from transcoders.harvest import harvest_batch


def window_split(window: int) -> tuple[int, int]:
    """(tokens before, tokens after) the activating token in a context of `window` tokens."""
    after = window // 4
    return window - 1 - after, after


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
    device = next(model.parameters()).device
    check_precision(config.precision, device)
    model = frozen_copy(model, config.precision)
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
        with autocast(config.precision, device):  # LM and encoder matmuls; activations come out fp32
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
