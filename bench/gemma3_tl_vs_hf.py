"""Where circuit-tracer's Gemma-3 logits part from ours: TransformerLens 3.2.1's own HookedTransformer (no
circuit-tracer) vs transformers 4.57 vs our model, on the cross-check's prompt: last-position logits and every layer's
residual. Run with the circuit-tracer venv's python after bench/gemma3_vs_circuit_tracer.py wrote its job file:

    /tmp/gemma-ct/ct-venv/bin/python bench/gemma3_tl_vs_hf.py > bench/results/gemma3_tl_vs_hf.json
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemma3_vs_circuit_tracer import TL_NAME, hf_gemma3  # noqa: E402

JOB = Path("/tmp/gemma3-vs-ct/ct_job.json")


def main() -> int:
    from transformer_lens import HookedTransformer
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    job = json.loads(JOB.read_text())
    model_dir = Path(job["model_dir"])
    hf = hf_gemma3(model_dir)
    tokens = torch.tensor(job["tokens"])[None]
    with torch.no_grad():
        hf_run = hf(tokens, output_hidden_states=True)
    with contextlib.redirect_stdout(sys.stderr):  # TransformerLens reports the load on stdout; stdout is the JSON
        tl = HookedTransformer.from_pretrained(TL_NAME, hf_model=hf,
                                               tokenizer=AutoTokenizer.from_pretrained(str(model_dir)), fold_ln=False,
                                               center_writing_weights=False, center_unembed=False, device="cpu",
                                               dtype=torch.float32, default_prepend_bos=False)
    with torch.no_grad():
        logits, cache = tl.run_with_cache(tokens)
    layers = range(tl.cfg.n_layers - 1)  # HF's last hidden state is past the final norm
    result = {
        "hf457_vs_ours_max_logit_error": float((hf_run.logits[0, -1] - torch.tensor(job["expected_logits"])).abs().max()),
        "tl_vs_hf457_max_logit_error": float((logits[0, -1] - hf_run.logits[0, -1]).abs().max()),
        "embed_max_diff": float((cache["blocks.0.hook_resid_pre"] - hf_run.hidden_states[0]).abs().max()),
        "resid_post_max_diff_per_layer": [
            float((cache[f"blocks.{layer}.hook_resid_post"] - hf_run.hidden_states[layer + 1]).abs().max())
            for layer in layers],
        "resid_max_abs_per_layer": [float(hf_run.hidden_states[layer + 1].abs().max()) for layer in layers],
        "tl_rope_bases": {"global": tl.cfg.rotary_base, "local": tl.cfg.rotary_base_local,
                          "attn_types": list(tl.cfg.attn_types)},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
