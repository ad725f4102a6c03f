"""Held-out evaluation of a CLT: nMSE (fraction of variance unexplained) and L0 per layer, dead features,
and the LM's cross-entropy when the CLT replaces every MLP; plus the plots a person looks at first."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparse_attention.data import iterate_blocks
from sparse_attention.evaluate import mean_ce
from sparse_attention.hook_points import HookFn, layers
from transcoders.clt import CrossLayerTranscoder
from transcoders.decode import source_contribution
from transcoders.harvest import MLPHooks, harvest_batch, lm_logits, mlp_in_point, mlp_out_point


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def reconstruction_metrics(model: nn.Module, clt: CrossLayerTranscoder, blocks: torch.Tensor, batch_size: int) -> dict:
    """nMSE = sum |y - y_hat|^2 / sum |y - mean y|^2 per layer (true MLP inputs in, position 0 excluded),
    L0 per layer, and the features that never fire on these tokens (dead)."""
    L, F = clt.n_layers, clt.n_features
    sse, sum_sq, count = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64), 0
    sum_y = torch.zeros(L, clt.d_model, dtype=torch.float64)
    active_total = torch.zeros(L, dtype=torch.float64)
    fired = torch.zeros(L, F, dtype=torch.bool)
    for tokens in iterate_blocks(blocks, batch_size):
        mlp_in, mlp_out = harvest_batch(model, tokens)  # [n, L, D]
        acts = clt.encode(mlp_in)  # [n, L, F]
        recon = clt.decode(acts)
        if clt.W_skip is not None:
            recon = recon + clt.skip_output(mlp_in)
        sse += (recon - mlp_out).double().pow(2).sum(dim=(0, 2))
        sum_sq += mlp_out.double().pow(2).sum(dim=(0, 2))
        sum_y += mlp_out.double().sum(0)
        count += len(mlp_out)
        active = acts > 0
        active_total += active.sum(dim=(0, 2)).double()
        fired |= active.any(0)
    variance = sum_sq - sum_y.pow(2).sum(-1) / count  # [L] total squared deviation from the mean
    dead = ~fired
    return {
        "nmse_per_layer": (sse / variance).tolist(),
        "nmse": float((sse / variance).mean()),
        "l0_per_layer": (active_total / count).tolist(),
        "l0": float((active_total / count).mean()),
        "dead_fraction": float(dead.float().mean()),
        "dead_fraction_per_layer": dead.float().mean(1).tolist(),
        "eval_tokens": count,
    }


class MLPReplacement(MLPHooks):
    """Context manager: every MLP's output at positions >= 1 is replaced, in the same forward.

    mode "clt": layer l's output becomes the CLT reconstruction sum_{s <= l} W_dec[s][:, l - s] a_s + b_dec[l]
    (+ x_l @ W_skip[l] with a skip path),
    where a_s = encode_layer(s, x_s) and x_s is the MLP input of layer s *in this replaced forward*
    (so errors compound through the layers, as in a replacement model). When layer s runs, its
    features' writes into layers s..L-1 are added to a running reconstruction (sparse: only active
    features are decoded). mode "zero": outputs set to 0. Position 0 keeps its true MLP output in
    both modes: the CLT never saw it (it is the attention sink).
    """

    def __init__(self, model: nn.Module, clt: CrossLayerTranscoder | None, mode: str):
        if mode not in ("clt", "zero") or (mode == "clt" and clt is None):
            raise ValueError(f"MLPReplacement mode must be 'zero' or 'clt' (with a CLT), got {mode!r}")
        self.model, self.n_layers, self.clt, self.mode = model, len(layers(model)), clt, mode
        self.mlp_in: torch.Tensor | None = None  # [batch, pos, D] the current layer's MLP input
        self.recon: torch.Tensor | None = None  # [batch, pos, L, D] normalised, reset at layer 0

    def hook_fns(self) -> dict[str, HookFn]:
        fns = {}
        for layer in range(self.n_layers):
            if self.mode == "clt":
                fns[mlp_in_point(layer)] = self._keep_input
            fns[mlp_out_point(layer)] = self._replace_output(layer)
        return fns

    def _keep_input(self, mlp_in: torch.Tensor) -> None:
        self.mlp_in = mlp_in

    def _replace_output(self, layer: int) -> HookFn:
        def replace(output):
            new = output.clone()
            if self.mode == "zero":
                new[:, 1:] = 0
                return new
            clt, x = self.clt, self.mlp_in  # [batch, pos, D]
            if layer == 0:
                self.recon = x.new_zeros(*x.shape[:-1], clt.n_layers, clt.d_model)
            acts = clt.encode_layer(layer, x).flatten(0, 1)  # [batch * pos, F]
            self.recon[..., layer:, :] += source_contribution(acts, clt.W_dec[layer]).view_as(
                self.recon[..., layer:, :])
            out = (self.recon[..., layer, :] + clt.b_dec[layer]) * clt.output_scale[layer]
            if clt.W_skip is not None:
                out = out + clt.skip_layer(layer, x)
            new[:, 1:] = out[:, 1:].to(output.dtype)
            return new
        return replace

    def _reset(self) -> None:
        self.mlp_in = self.recon = None


def ce_metrics(model: nn.Module, clt: CrossLayerTranscoder, blocks: torch.Tensor, batch_size: int) -> dict:
    """Held-out next-token CE: clean, with the CLT replacing every MLP, and with every MLP zero-ablated;
    `ce_recovered_fraction` = (zero - replaced) / (zero - clean), 1 when the CLT is perfect."""
    def logits(tokens):
        return lm_logits(model, tokens)

    clean = mean_ce(logits, blocks, batch_size)
    with MLPReplacement(model, clt, "clt"):
        replaced = mean_ce(logits, blocks, batch_size)
    with MLPReplacement(model, None, "zero"):
        zero = mean_ce(logits, blocks, batch_size)
    gap = zero - clean
    return {
        "ce_clean": clean,
        "ce_replaced": replaced,
        "ce_zero_ablated": zero,
        "ce_recovered_fraction": (zero - replaced) / gap if gap != 0 else float("nan"),
    }


def plot_per_layer(metrics: dict, title: str, path: Path) -> None:
    """One figure, three panels over layers: nMSE, L0, dead fraction."""
    plt = _pyplot()
    layers = range(len(metrics["nmse_per_layer"]))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("nmse_per_layer", "nMSE (FVU)"), ("l0_per_layer", "L0 (active features / token)"),
              ("dead_fraction_per_layer", "dead fraction")]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(layers, metrics[key], color="tab:blue")
        ax.set_xlabel("layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{title}: CE clean {metrics['ce_clean']:.3f}, CLT-replaced {metrics['ce_replaced']:.3f}, "
                 f"MLPs zeroed {metrics['ce_zero_ablated']:.3f} (recovered {metrics['ce_recovered_fraction']:.1%})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(history: list[dict], title: str, path: Path) -> None:
    """Training curves: batch nMSE, L0 per layer and dead fraction against tokens."""
    plt = _pyplot()
    tokens = [row["tokens"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, key, label in zip(axes, ("nmse", "l0", "dead_fraction"), ("batch nMSE", "mean L0", "dead fraction")):
        ax.plot(tokens, [row[key] for row in history])
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
