"""Evidence about each CLT feature from the weights alone, and the automatic label made from the evidence.

`weight_evidence`: the tokens a feature's decoder promotes and suppresses through the unembedding (the
sum of its decoder rows over the layers it writes to, times the final norm weight, times W_U), and the
input tokens whose embeddings excite its encoder most. Both are direct-path approximations, see the
function's docstring. `auto_label` names a feature from its top activating tokens and these.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
from torch import nn

from sparse_attention.architectures import architecture
from sparse_attention.hook_points import hf_model, module
from transcoders.clt import CrossLayerTranscoder


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
      where g_l is layer l's pre-MLP norm gain (the norm module itself computes it): as if the residual stream at
      layer l's MLP were the token's embedding alone (no attention, no earlier layers). For layer 0 with
      little attention output this is close to the truth; for later layers it is a rough direct-path guess.
    Only token ids below `vocab_size` (the tokenizer's) are considered.
    """
    arch = architecture(model)
    unembed = hf_model(model).get_output_embeddings().weight[:vocab_size].float()  # [V, D]
    embed = module(model, "embed")(torch.arange(vocab_size)).float()  # the module's own output (Gemma: scaled)
    final_gain = module(model, "ln_final").weight.float() + arch.gain_offset  # Gemma's (1 + w)
    L = clt.n_layers
    promoted, suppressed, inputs = [], [], []
    for layer in range(L):
        decoder = (clt.W_dec[layer] * clt.output_scale[layer:, None]).sum(1)  # [F, D] real units
        written = decoder * final_gain
        most, least = _top_columns(unembed, written, n)
        promoted.append(most)
        suppressed.append(least)
        # the norm in front of the MLP, whose output the CLT reads, as the family computes it (none: OLMo-2)
        normed = module(model, f"blocks.{layer}.ln2")(embed).float() if arch.has("blocks.{l}.ln2") else embed
        encoder = clt.W_enc[layer] / clt.input_scale[layer]  # b_enc shifts every token alike: not needed to rank
        inputs.append(_top_columns(normed, encoder, n)[0])
    return {"promoted": torch.stack(promoted), "suppressed": torch.stack(suppressed), "input": torch.stack(inputs)}


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
