"""The nodes of an attribution graph for one prompt, and the vectors they write and read.

`build_replacement` combines the frozen prompt with a CLT: active features (the CLT's activation,
position 0 excluded), error nodes (true MLP output - reconstruction - skip output, zero at position 0), token
embeddings,
constants (decoder biases; the whole MLP output at position 0) and logit targets (circuit-tracer's
rule: top tokens until 95% probability of the model's own (soft-capped) logits, at most 10; demeaned
unembedding rows, so a logit node is the demeaned pre-cap logit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from attribution.replacement import AttributionError, FrozenPrompt, ModelWeights


@dataclass(frozen=True)
class TranscoderWeights:
    """A cross-layer transcoder frozen in real units, float32 (see transcoders/clt.py)."""

    W_enc: torch.Tensor  # [L, F, d]
    b_enc: torch.Tensor  # [L, F]
    activation: Callable[[torch.Tensor], torch.Tensor]  # pre-activations [..., L, F] -> activations, no gradient
    W_dec: tuple[torch.Tensor, ...]  # per source layer l: [F, L - l, d]; [f, k] writes to MLP-out of l + k
    b_dec: torch.Tensor  # [L, d]
    W_skip: torch.Tensor | None = None  # [L, d_in, d_out]: MLP-out[l] += mlp_in[l] @ W_skip[l]; None: no skip path

    @property
    def n_features(self) -> int:
        """Features per layer."""
        return self.W_enc.shape[1]


def transcoder_weights(clt, model: ModelWeights | None = None) -> TranscoderWeights:
    """Freeze a CrossLayerTranscoder into checked TranscoderWeights: its encoder and decoder in real units
    (training-time input/output scales folded in) and its activation."""
    try:
        (W_enc, b_enc), (W_dec, b_dec) = clt.folded_encoder(), clt.folded_decoder()
        activation, W_skip = clt.frozen_activation(), clt.folded_skip()
    except AttributeError as err:
        raise AttributionError(f"{type(clt).__name__} is not a cross-layer transcoder ({err})") from None
    weights = TranscoderWeights(W_enc=W_enc, b_enc=b_enc, activation=activation, W_dec=W_dec, b_dec=b_dec,
                                W_skip=W_skip)
    n_layers, n_features, d_model = weights.W_enc.shape
    if W_skip is not None and tuple(W_skip.shape) != (n_layers, d_model, d_model):
        raise AttributionError(f"CLT W_skip has shape {tuple(W_skip.shape)}, expected {(n_layers, d_model, d_model)}")
    for name, shape in {"b_enc": (n_layers, n_features), "b_dec": (n_layers, d_model)}.items():
        if tuple(getattr(weights, name).shape) != shape:
            raise AttributionError(f"CLT {name} has shape {tuple(getattr(weights, name).shape)}, expected {shape}")
    for layer, w in enumerate(weights.W_dec):
        if tuple(w.shape) != (n_features, n_layers - layer, d_model):
            raise AttributionError(
                f"CLT W_dec[{layer}] has shape {tuple(w.shape)}, expected {(n_features, n_layers - layer, d_model)}"
            )
    if len(weights.W_dec) != n_layers:
        raise AttributionError(f"CLT has {len(weights.W_dec)} decoders for {n_layers} layers")
    if model is not None and (n_layers, d_model) != (model.n_layers, model.d_model):
        raise AttributionError(
            f"CLT has {n_layers} layers of width {d_model} but the model has {model.n_layers} of {model.d_model}"
        )
    return weights


@dataclass(frozen=True)
class LocalReplacementModel:
    """The linear model of one prompt plus its nodes.  Feature order is (layer, pos, feature) ascending."""

    model: ModelWeights
    clt: TranscoderWeights
    prompt: FrozenPrompt
    features: torch.Tensor  # [n_active, 3] long (layer, pos, feature)
    activations: torch.Tensor  # [n_active]
    errors: torch.Tensor  # [L, P, d] error-node write vectors, zero at position 0
    constants: torch.Tensor  # [L, P, d] MLP-out parts that are no node: b_dec, and mlp_out at position 0
    logit_tokens: torch.Tensor  # [n_logits] long
    logit_probs: torch.Tensor  # [n_logits]
    logit_vectors: torch.Tensor  # [n_logits, d] demeaned unembedding rows
    attn_constants: torch.Tensor | None = None  # [L, P, d] what attention writes from biases alone (v and o)

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    @property
    def n_pos(self) -> int:
        return len(self.prompt.tokens)

    @property
    def n_active(self) -> int:
        return len(self.features)

    def feature_writes(self, index: torch.Tensor, layer: int) -> torch.Tensor:
        """a_s * W_dec[l_s][f_s, layer - l_s] for active features `index` (all with l_s <= layer).  -> [n, d]"""
        src_layer, feat = self.features[index, 0], self.features[index, 2]
        out = torch.empty(len(index), self.model.d_model)
        for source_layer in src_layer.unique().tolist():
            mask = src_layer == source_layer
            out[mask] = self.clt.W_dec[source_layer][feat[mask], layer - source_layer]
        return out * self.activations[index, None]

    def feature_readouts(self, index: torch.Tensor) -> torch.Tensor:
        """Encoder rows with the frozen MLP-norm scale and gain (and LayerNorm's centring) folded in, read
        from resid_mid.  -> [n, d]"""
        layer, pos, feat = self.features[index].unbind(1)
        scale = self.prompt.mlp_inv_rms[layer, pos]
        return self._centred(self.clt.W_enc[layer, feat] * self.model.mlp_norm[layer] * scale[:, None])

    def logit_readouts(self) -> torch.Tensor:
        """Demeaned unembedding rows through the frozen final norm, read from the final residual.  [n_logits, d]"""
        return self._centred(self.logit_vectors * self.model.final_norm * self.prompt.final_inv_rms[-1])

    def _centred(self, readouts: torch.Tensor) -> torch.Tensor:
        """Readouts through LayerNorm's centring (C symmetric: r C = r - mean(r)) where norms centre."""
        return readouts - readouts.mean(-1, keepdim=True) if self.model.centred_norms else readouts

    def feature_norm_constants(self, index: torch.Tensor) -> torch.Tensor:
        """The part of active features' pre-activations from the pre-MLP norm's bias (LayerNorm).  -> [n]"""
        if self.model.mlp_norm_bias is None:
            return torch.zeros(len(index))
        layer, feat = self.features[index, 0], self.features[index, 2]
        return (self.clt.W_enc[layer, feat] * self.model.mlp_norm_bias[layer]).sum(-1)

    def logit_norm_constants(self) -> torch.Tensor:
        """The part of the demeaned logits from the final norm's bias (LayerNorm).  -> [n_logits]"""
        if self.model.final_norm_bias is None:
            return torch.zeros(len(self.logit_tokens))
        return self.logit_vectors @ self.model.final_norm_bias.float()

    @property
    def has_skip(self) -> bool:
        """Whether the CLT has a linear skip path (MLP input -> output) per layer."""
        return self.clt.W_skip is not None

    def skip_input_scale(self, layer: int) -> torch.Tensor:
        """[P] the frozen MLP-norm scale 1 / rms(resid_mid[layer]) where the skip path is a path; 0 at position 0,
        whose MLP output is a constant. The skip output is (resid_mid * scale * gain) @ W_skip[layer]."""
        scale = self.prompt.mlp_inv_rms[layer].clone()
        scale[0] = 0
        return scale

    def feature_pre_activations(self, index: torch.Tensor) -> torch.Tensor:
        """The true pre-activations W_enc . mlp_in + b_enc of active features `index`.  -> [n]"""
        layer, pos, feat = self.features[index].unbind(1)
        mlp_in = self.prompt.mlp_in[layer, pos]
        return (self.clt.W_enc[layer, feat] * mlp_in).sum(-1) + self.clt.b_enc[layer, feat]

    def demeaned_logits(self) -> torch.Tensor:
        """logit[t] - mean over the vocabulary, for each logit target: the pre-cap logit z where the model
        soft-caps its output (z is linear in the final residual; the output cap * tanh(z / cap) is not).  [n_logits]"""
        logits = self.prompt.logits
        return logits[self.logit_tokens] - logits.mean()


def feature_activations(mlp_in: torch.Tensor, clt: TranscoderWeights) -> torch.Tensor:
    """The CLT's activation of every feature at every position.  mlp_in [L, P, d] -> [L, P, F]"""
    pre = torch.einsum("lpd,lfd->lpf", mlp_in, clt.W_enc) + clt.b_enc[:, None]  # [L, P, F]
    return clt.activation(pre.transpose(0, 1)).transpose(0, 1)  # the CLT's layout is [..., L, F]


def reconstruction(features: torch.Tensor, activations: torch.Tensor, clt: TranscoderWeights,
                   n_pos: int) -> torch.Tensor:
    """CLT output incl. b_dec from active features.  features [n, 3], activations [n] -> [L, P, d]"""
    n_layers = clt.b_dec.shape[0]
    out = clt.b_dec[:, None].repeat(1, n_pos, 1)
    for source_layer in range(n_layers):
        index = (features[:, 0] == source_layer).nonzero().flatten()
        for chunk in index.split(RECONSTRUCTION_CHUNK):  # [n, L - l, d] writes: bounded, not every feature's at once
            pos, feat = features[chunk, 1], features[chunk, 2]
            writes = clt.W_dec[source_layer][feat].mul_(activations[chunk, None, None])  # [n, L - l, d]
            _add_writes(out, source_layer, pos, writes)
    return out


RECONSTRUCTION_CHUNK = 1024  # features whose decoder writes (to every later layer) are formed together


def _add_writes(out: torch.Tensor, source_layer: int, pos: torch.Tensor, writes: torch.Tensor) -> None:
    """out[source_layer + k, pos[i]] += writes[i, k]."""
    for k in range(writes.shape[1]):
        out[source_layer + k].index_add_(0, pos, writes[:, k])


def bias_writes(model: ModelWeights, prompt: FrozenPrompt) -> torch.Tensor | None:
    """What each layer's attention writes from its biases alone (constants: the frozen pattern's row sums
    times the value bias, through W_O, plus the output bias); None without biases.  -> [L, P, d]"""
    if model.b_V is None and model.b_O is None:
        return None
    out = torch.zeros(model.n_layers, len(prompt.tokens), model.d_model)
    if model.b_V is not None:
        group = model.n_heads // model.n_kv_heads
        row_sums = prompt.patterns.sum(-1)  # [L, H, P]
        bias = model.b_V.unflatten(-1, (model.n_kv_heads, -1)).repeat_interleave(group, 1)  # [L, H, dh]
        out += torch.einsum("lhp,lhe->lphe", row_sums, bias).flatten(2) @ model.W_O.transpose(1, 2)
    if model.b_O is not None:
        out += model.b_O[:, None]
    return out


def select_logit_targets(logits: torch.Tensor, max_n_logits: int, desired_prob: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """circuit-tracer's salient logits: top tokens until cumulative probability >= desired_prob, at most
    max_n_logits.  logits [vocab] -> (token ids [n], probabilities [n])"""
    probs = torch.softmax(logits, dim=-1)
    top_p, top_idx = torch.topk(probs, min(max_n_logits, len(probs)))
    cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_prob)) + 1
    return top_idx[:cutoff], top_p[:cutoff]


def build_replacement(model: ModelWeights, clt: TranscoderWeights, prompt: FrozenPrompt,
                      max_n_logits: int = 10, desired_logit_prob: float = 0.95) -> LocalReplacementModel:
    """Nodes and constants of the local replacement model of `prompt`."""
    acts = feature_activations(prompt.mlp_in, clt)  # [L, P, F]
    acts[:, 0] = 0  # BOS-position features are no nodes: their writes stay inside the constant
    features = acts.nonzero()  # [n, 3] in (layer, pos, feature) order
    activations = acts[features.unbind(1)]
    recon = reconstruction(features, activations, clt, len(prompt.tokens))
    if clt.W_skip is not None:  # the skip output is no node: it is linear in resid_mid, a path for the sweep
        recon = recon + torch.bmm(prompt.mlp_in, clt.W_skip)  # [L, P, d]
    errors = prompt.mlp_out - recon
    errors[:, 0] = 0
    constants = clt.b_dec[:, None].repeat(1, len(prompt.tokens), 1)
    constants[:, 0] = prompt.mlp_out[:, 0]
    tokens, probs = select_logit_targets(prompt.output_logits, max_n_logits, desired_logit_prob)  # capped: the model's
    vectors = model.unembed[tokens] - model.unembed.mean(0)
    return LocalReplacementModel(
        model=model, clt=clt, prompt=prompt, features=features, activations=activations, errors=errors,
        constants=constants, logit_tokens=tokens, logit_probs=probs, logit_vectors=vectors,
        attn_constants=bias_writes(model, prompt),
    )
