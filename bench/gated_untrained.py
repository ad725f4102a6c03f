"""A gated SmolLM2 without post-training, for timing stages that need a gated checkpoint (never for results).

The sparsify stage's first step alone: the preset's sparsify config (pipeline/presets/demo.yaml), held-out CE of
the dense model, the offset chosen by `calibrate_offset` (smallest candidate within the calibration tolerance of
dense CE), and the GatedModel saved with that offset, untrained. Its gates are those of the sparsify stage's
starting point, not of a trained sparse model: timings on it count the gate work (and both gate modes), not the
sparse model's circuits. The checkpoint's gate.json says so (`untrained: true`, the calibration trials).
Usage: nice -n 5 python bench/gated_untrained.py --out /tmp/gated_untrained [--preset pipeline/presets/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from sparse_attention.config import SparsifyConfig  # noqa: E402
from sparse_attention.data import load_token_blocks  # noqa: E402
from sparse_attention.evaluate import calibrate_offset, mean_ce  # noqa: E402
from sparse_attention.gated_attention import GatedModel  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory of the gated checkpoint")
    parser.add_argument("--preset", type=Path, default=ROOT / "pipeline/presets/demo.yaml")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = SparsifyConfig.model_validate(yaml.safe_load(args.preset.read_text())["sparsify"])
    if config.gate.offset_init != "auto":
        raise SystemExit(f"{args.preset}: sparsify.gate.offset_init is {config.gate.offset_init}, not 'auto': "
                         "there is no calibration to run")
    start = time.process_time()
    model, tokenizer = load_model(config.model.name, tiny=config.model.tiny)
    model.eval().requires_grad_(False)
    heldout = load_token_blocks(config.data, tokenizer).heldout[: config.eval.heldout_blocks]
    with torch.no_grad():
        dense_ce = mean_ce(lambda t: model(input_ids=t).logits, heldout, config.eval.batch_size)
        gated = GatedModel(model, offset_init=0.0, learn_offset=config.gate.learn_offset,
                           offset_scope=config.gate.offset_scope)
        offset, trials = calibrate_offset(gated, dense_ce, heldout, config.eval.batch_size,
                                          config.gate.offset_candidates, config.gate.calibration_tolerance)
    metadata = {"untrained": True, "made_by": "bench/gated_untrained.py " + " ".join(sys.argv[1:]),
                "preset": str(args.preset), "dense_ce": dense_ce, "offset": offset, "offset_calibration": trials,
                "heldout_blocks": len(heldout), "cpu_s": time.process_time() - start}
    gated.save(args.out, tokenizer, metadata)
    print(json.dumps(metadata))


if __name__ == "__main__":
    main()
