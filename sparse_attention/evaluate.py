"""Held-out evaluation of a gated model: CE (original, control, sparse), KL(original || sparse), open-edge
fractions overall / per layer / per head, open keys per query, and the plots a person looks at first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparse_attention.data import iterate_blocks
from sparse_attention.gated_attention import GatedModel


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """logits [b, pos, vocab] (any float dtype) -> float32 log-probabilities of each next token
    [b * (pos - 1), vocab]: computed once, they give both the CE and the KL below."""
    return F.log_softmax(logits[:, :-1].flatten(0, 1).float(), dim=-1)


def ce_from_log_probs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, nats.  log_probs [b * (pos - 1), vocab]; tokens [b, pos]."""
    return F.nll_loss(log_probs, tokens[:, 1:].flatten())


def kl_from_log_probs(reference_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || model) per next token, nats.  Both [b * (pos - 1), vocab]."""
    return F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="batchmean")


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, nats.  logits [b, pos, vocab]; tokens [b, pos]."""
    return ce_from_log_probs(next_token_log_probs(logits), tokens)


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(reference || model) of the next-token distributions, nats.  Both [b, pos, vocab]."""
    return kl_from_log_probs(next_token_log_probs(reference_logits), next_token_log_probs(logits))


@torch.no_grad()
def mean_ce(
    logits_fn: Callable[[torch.Tensor], torch.Tensor], blocks: torch.Tensor, batch_size: int, device="cpu"
) -> float:
    """Token-weighted held-out CE of `logits_fn(tokens) -> logits` over all blocks (moved to `device`)."""
    total, count = 0.0, 0
    for tokens in iterate_blocks(blocks, batch_size):
        tokens = tokens.to(device)
        n = tokens[:, 1:].numel()
        total += next_token_ce(logits_fn(tokens), tokens).item() * n
        count += n
    return total / count


@dataclass
class EdgeStats:
    context_length: int
    open_edges: np.ndarray  # [layer, head] int
    causal_pairs: np.ndarray  # [layer, head] int
    open_keys_histogram: np.ndarray  # [context_length + 1] queries with n open keys, over layers and heads

    @property
    def fraction_per_head(self) -> np.ndarray:  # [layer, head]
        return self.open_edges / np.maximum(self.causal_pairs, 1)

    @property
    def fraction_per_layer(self) -> np.ndarray:  # [layer]
        return self.open_edges.sum(1) / np.maximum(self.causal_pairs.sum(1), 1)

    @property
    def edge_fraction(self) -> float:
        return float(self.open_edges.sum() / max(1, self.causal_pairs.sum()))

    def open_keys_summary(self) -> dict:
        counts = self.open_keys_histogram
        n = np.arange(len(counts))
        total = counts.sum()
        cdf = np.cumsum(counts) / max(1, total)
        return {
            "mean": float((n * counts).sum() / max(1, total)),
            "median": int(np.searchsorted(cdf, 0.5)),
            "p90": int(np.searchsorted(cdf, 0.9)),
            "p99": int(np.searchsorted(cdf, 0.99)),
            "max": int(n[counts > 0].max()) if total else 0,
            "fraction_queries_with_no_open_key": float(counts[0] / max(1, total)),
        }

    @property
    def keys_per_fraction(self) -> float:
        """Causal keys per query on average, (T + 1) / 2: open keys per query = edge fraction x this."""
        return (self.context_length + 1) / 2

    def to_json(self) -> dict:
        return {
            "context_length": self.context_length,
            "edge_fraction": self.edge_fraction,
            "edge_fraction_per_layer": self.fraction_per_layer.tolist(),
            "edge_fraction_per_head": self.fraction_per_head.tolist(),
            "open_keys_per_query": self.open_keys_summary(),
            "open_keys_per_query_per_layer": (self.fraction_per_layer * self.keys_per_fraction).tolist(),
            "open_keys_per_query_per_head": (self.fraction_per_head * self.keys_per_fraction).tolist(),
        }

    def heads_over(self, threshold: float) -> list[dict]:
        """Every head whose open-edge fraction exceeds `threshold`, most open first."""
        fractions = self.fraction_per_head
        heads = [{"layer": int(layer), "head": int(head), "edge_fraction": float(fractions[layer, head])}
                 for layer, head in zip(*np.nonzero(fractions > threshold))]
        return sorted(heads, key=lambda h: -h["edge_fraction"])


def _add_gate_counts(record, open_edges: np.ndarray, pairs: np.ndarray, histogram: np.ndarray) -> None:
    """Add one forward's hard-gate counts (record_masks=True) into the running [layer, head] and histogram arrays."""
    o, p = record.edge_counts()
    open_edges += o.cpu().numpy()
    pairs += p.cpu().numpy()
    for mask in record.gate_masks:  # [b, h, q, k]
        histogram += np.bincount(mask.sum(-1).flatten().cpu().numpy(), minlength=len(histogram))
    record.gate_masks.clear()


@torch.no_grad()
def edge_statistics(gated: GatedModel, blocks: torch.Tensor, batch_size: int) -> EdgeStats:
    """Count hard-open gates over held-out blocks (eval mode), with the open-keys-per-query histogram."""
    gated.eval().set_mode("eval")
    context = blocks.shape[1]
    open_edges = np.zeros((gated.n_layers, gated.n_heads), dtype=np.int64)
    pairs = np.zeros_like(open_edges)
    histogram = np.zeros(context + 1, dtype=np.int64)
    for tokens in iterate_blocks(blocks, batch_size):
        _add_gate_counts(gated(tokens.to(gated.offsets.device), record_masks=True).gate_record,
                         open_edges, pairs, histogram)
    return EdgeStats(context, open_edges, pairs, histogram)


@dataclass
class HeldoutComparison:
    """The original and the hard-gated model on the held-out blocks of one source at one length."""

    source: str
    dense_ce: float
    sparse_ce: float
    kl_per_token: float  # mean KL(original || sparse) over next-token positions, nats
    tokens: int  # next-token positions scored
    edges: EdgeStats

    def to_json(self) -> dict:
        return {"source": self.source, **self.edges.to_json(), "dense_ce": self.dense_ce, "sparse_ce": self.sparse_ce,
                "ce_excess": self.sparse_ce - self.dense_ce, "kl_per_token": self.kl_per_token,
                "scored_tokens": self.tokens}


@torch.no_grad()
def compare_on_heldout(
    reference: torch.nn.Module, gated: GatedModel, blocks: torch.Tensor, batch_size: int, source: str
) -> HeldoutComparison:
    """One pass over held-out blocks [n, T]: CE of the original and of the hard-gated model, KL(original ||
    sparse) per next-token position (all token-weighted), and the hard gates' edge statistics."""
    gated.eval().set_mode("eval")
    context = blocks.shape[1]
    open_edges = np.zeros((gated.n_layers, gated.n_heads), dtype=np.int64)
    pairs = np.zeros_like(open_edges)
    histogram = np.zeros(context + 1, dtype=np.int64)
    dense, sparse, kl, count = 0.0, 0.0, 0.0, 0
    for tokens in iterate_blocks(blocks, batch_size):
        tokens = tokens.to(gated.offsets.device)
        reference_logits = reference(input_ids=tokens).logits
        out = gated(tokens, record_masks=True)
        n = tokens[:, 1:].numel()
        dense += next_token_ce(reference_logits, tokens).item() * n
        sparse += next_token_ce(out.logits, tokens).item() * n
        kl += next_token_kl(reference_logits, out.logits).item() * n
        count += n
        _add_gate_counts(out.gate_record, open_edges, pairs, histogram)
    return HeldoutComparison(source, dense / count, sparse / count, kl / count, count,
                             EdgeStats(context, open_edges, pairs, histogram))


@torch.no_grad()
def calibrate_offset(
    gated: GatedModel, dense_ce: float, blocks: torch.Tensor, batch_size: int, candidates: list[float], tolerance: float
) -> tuple[float, list[dict]]:
    """Smallest offset b whose untrained gated model is within `tolerance` nats of dense CE.

    Small b keeps gradients alive (sigmoid is flat far from 0), large b keeps the start exact.
    """
    trials = []
    for offset in sorted(candidates):
        gated.offsets.fill_(offset)
        ce = mean_ce(lambda t: gated.set_mode("eval")(t).logits, blocks, batch_size, gated.offsets.device)
        trials.append({"offset": offset, "ce": ce, "excess": ce - dense_ce})
        if ce - dense_ce <= tolerance:
            return offset, trials
    raise ValueError(
        f"no gate.offset_candidates gets within {tolerance} nats of dense CE {dense_ce:.4f} "
        f"(tried {[round(t['excess'], 4) for t in trials]}); add larger candidates"
    )


def plot_edge_fractions(stats: list[EdgeStats], path) -> None:
    """Heatmaps of the open-edge fraction per layer and head, one panel per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stats), figsize=(4.5 * len(stats), 6), squeeze=False)
    for ax, s in zip(axes[0], stats):
        image = ax.imshow(s.fraction_per_head, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, s.fraction_per_head.max()))
        ax.set_title(f"open edges at {s.context_length} tokens: {100 * s.edge_fraction:.2f}%")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="open fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MAX_TOKEN_LABELS = 32  # token labels per axis of an attention-pattern figure; longer prompts label every k-th token


@torch.no_grad()
def plot_attention_patterns(gated: GatedModel, tokenizer, prompt: str, path, n_heads_shown: int = 4) -> None:
    """Dense (softmax) vs sparse (gated) attention for one prompt, on the heads the gates changed most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.cat([torch.tensor([[start]]), ids], dim=1).to(gated.offsets.device)
    labels = [tokenizer.decode([t]) for t in ids[0].tolist()]
    gated.set_mode("dense")
    dense = _attention_weights(gated, ids)
    gated.set_mode("eval")
    sparse = _attention_weights(gated, ids)
    removed_mass = [(float(np.abs(d - s).sum()), layer, head)
                    for layer, (d, s) in enumerate(zip(dense, sparse)) for head in range(d.shape[0])]
    chosen = sorted(removed_mass, reverse=True)[:n_heads_shown]  # heads the gates changed most
    # One shared token axis, labelled on the outer panels only, at most MAX_TOKEN_LABELS labels: matplotlib makes
    # every tick label an object, and at 60 tokens on 8 panels the labels cost ~3x the rest of the figure.
    step = -(-len(labels) // MAX_TOKEN_LABELS)
    ticks = list(range(0, len(labels), step))
    fig, axes = plt.subplots(2, len(chosen), figsize=(3.6 * len(chosen), 7.5), squeeze=False, sharex=True, sharey=True)
    for col, (_, layer, head) in enumerate(chosen):
        for row, (name, weights) in enumerate((("dense", dense), ("sparse", sparse))):
            ax = axes[row][col]
            ax.imshow(weights[layer][head], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"{name} L{layer} H{head}", fontsize=9)
            ax.tick_params(axis="x", labelrotation=90, labelsize=6)
            ax.tick_params(axis="y", labelsize=6)
    axes[0][0].set_xticks(ticks, [labels[i] for i in ticks])
    axes[0][0].set_yticks(ticks, [labels[i] for i in ticks])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _attention_weights(gated: GatedModel, ids: torch.Tensor) -> list[np.ndarray]:
    """Per layer [head, q, k] attention weights actually applied to values (gated unless dense mode)."""
    attentions = gated(ids, output_attentions=True).attentions
    return [a[0].float().cpu().numpy() for a in attentions]


def plot_training_curves(history: list[dict], path) -> None:
    """CE excess over the reference (noisy and, when measured, deterministic gates), open-edge fraction and
    the multiplier against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [row["tokens"] for row in history]
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    axes[0].plot(tokens, [row["ce_excess"] for row in history], lw=0.8, label="CE - reference, noisy gates (batch)")
    if history and "hard_ce_excess" in history[0]:
        axes[0].plot(tokens, [row["hard_ce_excess"] for row in history], lw=0.8,
                     label="CE - reference, deterministic gates (batch)")
    axes[0].plot(tokens, [row["constraint_value"] for row in history], lw=0.8, label="constraint value (batch)")
    axes[0].plot(tokens, [row["smoothed_violation"] for row in history], lw=1.2, label="smoothed violation")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_ylabel("nats")
    axes[0].legend(fontsize=8)
    axes[1].plot(tokens, [row["open_fraction"] for row in history], lw=1)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("open-edge fraction (train gates)")
    streams = sorted({key for row in history for key in row.get("multipliers", {})})
    for stream in streams:  # per-stream multipliers (controller.per_stream), from each stream's first batch on
        seen = [(row["tokens"], row["multipliers"][stream]) for row in history if stream in row.get("multipliers", {})]
        axes[2].plot([t for t, _ in seen], [m for _, m in seen], lw=1, label=stream)
    if streams:
        axes[2].legend(fontsize=8)
    else:
        axes[2].plot(tokens, [row["multiplier"] for row in history], lw=1)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("multiplier lambda")
    axes[2].set_xlabel("training tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
