"""Where a sparsify checkpoint's CE excess comes from: held-out CE minus the original's, with the checkpoint's
trained weights, under deterministic gates at its own offset and at higher ones, and with the gates removed.
Excess that vanishes with the gates removed is the gates' (offset too low for where the weights put the scores);
excess that stays is the weights'. Model-scope checkpoints (one offset); 1 thread, fp32.

    python bench/sparsify_offset_probe.py runs/x/model/checkpoints/train_state.pt --tag y
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.sparsify_offset_scope import RESULTS, machine  # noqa: E402
from sparse_attention.data import DataConfig, load_token_blocks  # noqa: E402
from sparse_attention.evaluate import mean_ce  # noqa: E402
from sparse_attention.gated_attention import GatedModel  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--blocks", type=int, default=8, help="held-out blocks of 128 tokens per corpus")
    parser.add_argument("--offsets", type=float, nargs="+", default=[2.0, 4.0, 8.0], help="besides its own (+1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before, cpu_started = os.getloadavg(), time.process_time()
    model, tokenizer = load_model("smollm2-135m")
    model.eval()
    blocks = {source: load_token_blocks(DataConfig(source=source, context_length=128), tokenizer).heldout[: args.blocks]
              for source in ("python-docs", "brown")}
    original = {source: mean_ce(lambda t: model(input_ids=t).logits, b, 4) for source, b in blocks.items()}
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=True, mmap=True)
    if state["offsets"].numel() != 1:
        sys.exit(f"{args.checkpoint} holds {state['offsets'].numel()} offsets; this probe takes model-scope runs")
    gated = GatedModel(model, offset_init=0.0, offset_scope="model")
    named = dict(gated.model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["weights"].items():
            named[name].copy_(tensor)
    own = float(state["offsets"].flatten()[0])

    def excess(mode: str) -> dict:
        return {source: mean_ce(lambda t: gated.set_mode(mode)(t).logits, b, 4) - original[source]
                for source, b in blocks.items()}

    rows = []
    for offset in [own, own + 1.0, *args.offsets]:
        with torch.no_grad():
            gated.offsets.fill_(offset)
        rows.append({"offset": offset, "hard_gate_ce_excess": excess("eval")})
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "precision": "fp32",
              "checkpoint_step": int(state["step"]), "own_offset": own, "tokens_per_corpus": args.blocks * 128,
              "original_ce": original, "by_offset": rows, "gates_removed_ce_excess": excess("dense"),
              "cpu_seconds": time.process_time() - cpu_started, "load_average_before": load_before,
              "load_average_after": os.getloadavg()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"sparsify_offset_probe_{args.tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
