"""Does a sparse model's task behaviour hold on templates it never trained on? Task distillation
(`train.task_distill`) trains on the evaluation's templates filled with other words; this measures dense vs sparse
clean logit difference and accuracy (`prompts.metrics.dense_vs_sparse`) on IOI and antonyms prompts of templates in
neither set (HELD_OUT_TEMPLATES, filled from the evaluation word lists), beside the stage's own task prompts
(`generate_task(task, tokenizer, n, seed)`, the evaluation templates), for each gated model.

    python bench/task_template_transfer.py --sparse F400=runs/F/model/model P464=runs/P/model/model --tag F400_P464

Writes bench/results/task_template_transfer_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

HELD_OUT_TEMPLATES = {
    "antonyms": ('The reverse of "{word}" is "', 'What is the opposite of "{word}"? It is "',
                 'Opposite of "{word}": "'),
    "ioi": ("Yesterday, {X} and {Y} walked to the {place}. {S} handed a {object} to",
            "At the {place}, {X} and {Y} found a {object}. {S} passed it to",
            "{X} and {Y} met at the {place}, and later {S} gave a {object} to"),
}


def held_out_prompts(task: str, tokenizer, n: int, seed: int) -> list:
    """`n` distinct valid prompts of `task` from HELD_OUT_TEMPLATES and the evaluation word lists, by the task's
    own generator (same corruption, answers and roles)."""
    from prompts.tasks import antonyms_candidate, distinct_valid_prompts, ioi_candidate, vocab_for

    candidate = {"antonyms": antonyms_candidate, "ioi": ioi_candidate}[task]
    vocab, rng = vocab_for(tokenizer), random.Random(f"held-out:{task}:{seed}")
    return distinct_valid_prompts(lambda: candidate(rng, vocab, HELD_OUT_TEMPLATES[task]), tokenizer, n,
                                  f"{task} (held-out templates)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--sparse", nargs="+", required=True, help="NAME=gated checkpoint directory")
    parser.add_argument("--n", type=int, default=48, help="prompts per task and template set")
    parser.add_argument("--seed", type=int, default=1, help="the evaluation templates' seed (the stage's eval.task_seed)")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()

    from prompts.metrics import dense_vs_sparse, logits_fn
    from prompts.tasks import generate_task
    from sparse_attention.gated_attention import load_gated_model
    from sparse_attention.models import load_model

    torch.set_num_threads(1)
    original, tokenizer = load_model(args.dense)
    sets = {}
    for task in HELD_OUT_TEMPLATES:
        sets[f"{task}/evaluation_templates"] = generate_task(task, tokenizer, args.n, args.seed)
        sets[f"{task}/held_out_templates"] = held_out_prompts(task, tokenizer, args.n, args.seed)
    result = {"command": "python " + " ".join(sys.argv), "dense": args.dense, "n": args.n,
              "held_out_templates": HELD_OUT_TEMPLATES, "models": {}}
    for item in args.sparse:
        name, _, directory = item.partition("=")
        sparse = load_gated_model(directory)[0].eval().set_mode("eval")
        scores = dense_vs_sparse(logits_fn(original), logits_fn(sparse), tokenizer, sets)
        result["models"][name] = {"directory": directory, "sets": scores}
        for key, row in scores.items():
            print(f"{name} {key}: dense {row['dense']['mean_logit_diff']:.3f} ({row['dense']['accuracy']:.2f}) "
                  f"sparse {row['sparse']['mean_logit_diff']:.3f} ({row['sparse']['accuracy']:.2f}) "
                  f"ratio {row['logit_diff_ratio']}", flush=True)
    out = ROOT / "bench" / "results" / f"task_template_transfer_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
