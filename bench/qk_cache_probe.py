"""What one cached QK position holds on SmolLM2-135M with a CLT, the chunk plans at two budgets, and the CPU
seconds to rebuild a position's parts up to the last layer (what an LRU miss costs at most).

    HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python bench/qk_cache_probe.py --clt /tmp/bound/clt512

Prints one JSON line (the CLT: e.g. the calibrated random one of bench/attribution_heads_scaling.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from attribution_step import prompt_of_length  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clt", required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--edges", type=int, default=2000, help="attention edges planned for (the default limit)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from attribution.config import AttentionAttributionConfig
    from attribution.nodes import build_replacement, transcoder_weights
    from attribution.qk import (
        QKChunks,
        ResidualComponents,
        features_per_position,
        max_components,
        plan_qk_chunks,
        qk_chunk_bytes,
        qk_output_bytes,
    )
    from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt
    from sparse_attention.models import load_model
    from transcoders.clt import load_clt

    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    weights = extract_weights(model)
    clt = transcoder_weights(load_clt(args.clt), weights)
    lrm = build_replacement(weights, clt, freeze_prompt(model, tokenize_prompt(tokenizer, prompt_of_length(tokenizer, args.tokens))))
    n = max_components(lrm)
    per_position = qk_chunk_bytes(QKChunks(2, 1, 2), n, lrm) - qk_chunk_bytes(QKChunks(2, 1, 1), n, lrm)
    output = qk_output_bytes(args.edges, AttentionAttributionConfig())
    plans = {gb: str(plan_qk_chunks(lrm, args.edges, int(gb * 2**30), output)) for gb in (1.5, 1.8)}
    components = ResidualComponents(lrm, 1)
    last = lrm.n_layers - 1
    components.parts(5, last)
    started = time.process_time()
    for pos in range(6, 26):
        components.parts(pos, last)
    print(json.dumps({"n_pos": lrm.n_pos, "has_skip": lrm.has_skip, "features_per_position_max": features_per_position(lrm),
                      "n_components": n, "bytes_per_cached_position": per_position, "plans": plans,
                      "parts_build_cpu_s": (time.process_time() - started) / 20, "load_average": os.getloadavg()}))


if __name__ == "__main__":
    main()
