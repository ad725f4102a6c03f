"""Do a sparse model's gates keep the attention edges a task's dense circuit reads? For each task's prompts (the
sparsify stage's task set: `generate_task(task, tokenizer, n, seed)`), the edge from the last position (where the
metric reads) to the tokens of one role (antonyms: the cue word; IOI: the indirect object, IO) in every head:
the original model's attention weight on it, and in each gated model (deterministic gates) whether a gate is open
to it and the weight it passes (softmax x gate, not renormalised). Heads named by --heads are reported one by one
(default: the dense circuits' top heads on SmolLM2 from bench/results/circuit_head_overlap_smollm2_F400_K464_32.json);
all heads are summarised by how much of the original's attention on the role they keep.

    python bench/task_edge_gates.py --sparse F=runs/F/model/model N=runs/N/model/model --tag F400_N464

Writes bench/results/task_edge_gates_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROLE = {"antonyms": "cue", "ioi": "IO"}
DEFAULT_HEADS = {"antonyms": ["L22H7", "L22H8", "L25H7", "L24H5", "L20H8", "L24H7"],
                 "ioi": ["L23H3", "L20H0", "L16H0", "L17H4", "L29H1", "L19H2"]}


def role_attention(patterns: list[torch.Tensor], roles: tuple[tuple[str, ...], ...], role: str) -> torch.Tensor:
    """Per prompt, layer and head: the last position's attention weight summed over the tokens of `role`.
    patterns: per layer [batch, head, q, k]  -> [batch, layer, head]"""
    mask = torch.tensor([[r == role for r in prompt_roles] for prompt_roles in roles], dtype=torch.float32)  # [b, k]
    if not bool((mask.sum(1) > 0).all()):
        sys.exit(f"a prompt has no token of role {role!r}")
    return torch.stack([(p[:, :, -1, :] * mask[:, None, :]).sum(-1) for p in patterns], dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--sparse", nargs="+", required=True, help="NAME=gated checkpoint directory")
    parser.add_argument("--tasks", nargs="+", default=["antonyms", "ioi"], choices=sorted(ROLE))
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1, help="the task prompts' seed (the sparsify stage's eval.task_seed)")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()

    from prompts.batches import encode_prompts
    from prompts.tasks import generate_task
    from sparse_attention.gated_attention import load_gated_model
    from sparse_attention.models import load_model

    torch.set_num_threads(1)
    original, tokenizer = load_model(args.dense, attn_implementation="eager")
    sparse = {}
    for item in args.sparse:
        name, _, directory = item.partition("=")
        sparse[name] = load_gated_model(directory)[0].eval().set_mode("eval")
    result = {"command": "python " + " ".join(sys.argv), "dense": args.dense,
              "sparse": dict(item.partition("=")[::2] for item in args.sparse), "tasks": {}}
    for task in args.tasks:
        prompts = generate_task(task, tokenizer, args.n, args.seed)
        dense_weight, gate_open, sparse_weight = [], {n: [] for n in sparse}, {n: [] for n in sparse}
        with torch.no_grad():
            for batch in encode_prompts(prompts, tokenizer):
                out = original(input_ids=batch.clean, output_attentions=True)
                dense_weight.append(role_attention(list(out.attentions), batch.roles, ROLE[task]))
                for name, model in sparse.items():
                    gated = model(batch.clean, record_masks=True, output_attentions=True)
                    masks = [m.float() for m in gated.gate_record.gate_masks]
                    gate_open[name].append(role_attention(masks, batch.roles, ROLE[task]) > 0)
                    sparse_weight[name].append(role_attention(list(gated.attentions), batch.roles, ROLE[task]))
        dense_weight = torch.cat(dense_weight)  # [n, layer, head]
        n_heads = dense_weight.shape[2]
        dense_mean = dense_weight.mean(0).flatten()  # [layer * head]
        top = dense_mean.topk(20).indices  # the heads attending most to the role in the original
        entry = {"role": ROLE[task], "n_prompts": len(prompts), "heads": {}, "all_heads": {}}
        for name in sparse:
            opened, weight = torch.cat(gate_open[name]).float(), torch.cat(sparse_weight[name])
            entry["all_heads"][name] = {
                "attention_on_role_kept": (weight.sum() / dense_weight.sum()).item(),  # over prompts, layers, heads
                "top20_dense_heads_gate_open_share": opened.mean(0).flatten()[top].mean().item(),
                "top20_dense_heads_weight_kept": (weight.mean(0).flatten()[top].sum() / dense_mean[top].sum()).item()}
            for head_name in DEFAULT_HEADS[task]:
                layer, head = (int(x) for x in head_name[1:].split("H"))
                row = entry["heads"].setdefault(head_name, {"original_weight": dense_weight[:, layer, head].mean().item()})
                row[name] = {"gate_open_share": opened[:, layer, head].mean().item(),
                             "weight": weight[:, layer, head].mean().item()}
        entry["top20_dense_heads"] = [f"L{int(i) // n_heads}H{int(i) % n_heads}" for i in top]
        result["tasks"][task] = entry
        print(task, json.dumps(entry["all_heads"]))
        for head_name, row in entry["heads"].items():
            print(f"  {head_name}: original {row['original_weight']:.3f} " + " ".join(
                f"{n} open {row[n]['gate_open_share']:.2f} weight {row[n]['weight']:.3f}" for n in sparse))
    out = ROOT / "bench" / "results" / f"task_edge_gates_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
