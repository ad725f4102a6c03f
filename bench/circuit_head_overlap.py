"""Which heads the dense and the sparse circuits of one task use: from `python -m circuits --out` files, the heads
of each circuit (the first `count_at_target` of its ranking, as the circuit's size counts them), their overlap,
where they sit (layers in thirds), and the top heads by effect on each side.

    python bench/circuit_head_overlap.py bench/results/circuits_smollm2_F400_32_ioi.json ... --n-layers 30 --tag s14

Writes bench/results/circuit_head_overlap_<tag>.json (one entry per file and gate mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def head_name(component: str) -> str:
    """'blocks.23.head.3' -> 'L23H3'"""
    _, layer, _, head = component.split(".")
    return f"L{layer}H{head}"


def head_layer(name: str) -> int:
    """'L23H3' -> 23"""
    return int(name[1:].split("H")[0])


def circuit_heads(side: dict, where: str) -> list[str]:
    """The heads of one side's circuit, in ranking order; refused when the stored ranking is shorter than the circuit."""
    heads = side["heads"]
    if heads["count_at_target"] > len(heads["top"]):
        sys.exit(f"{where}: the stored ranking ({len(heads['top'])} heads) is shorter than the circuit "
                 f"({heads['count_at_target']})")
    return [head_name(name) for name, _ in heads["top"][: heads["count_at_target"]]]


def overlap(result: dict, n_layers: int, top: int = 8) -> list[dict]:
    """Per task and gate mode of one circuits result: the two circuits' heads compared."""
    rows = []
    for task, modes in result["tasks"].items():
        for mode, sides in modes.items():
            dense = circuit_heads(sides["dense"], f"{task}/{mode} dense")
            sparse = circuit_heads(sides["sparse"], f"{task}/{mode} sparse")
            if max(head_layer(name) for name in dense + sparse) >= n_layers:
                sys.exit(f"{task}/{mode}: a head beyond --n-layers {n_layers}")
            thirds = {side: [sum(1 for name in names if head_layer(name) * 3 // n_layers == third) for third in range(3)]
                      for side, names in (("dense", dense), ("sparse", sparse))}
            rows.append({
                "task": task, "gates": mode, "dense_heads": len(dense), "sparse_heads": len(sparse),
                "shared": len(set(dense) & set(sparse)), "dense_only": sorted(set(dense) - set(sparse)),
                "sparse_only": sorted(set(sparse) - set(dense)), "heads_by_layer_third": thirds,
                "dense_top": [[head_name(n), round(e, 3)] for n, e in sides["dense"]["heads"]["top"][:top]],
                "sparse_top": [[head_name(n), round(e, 3)] for n, e in sides["sparse"]["heads"]["top"][:top]],
            })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+", help="circuits --out JSON files")
    parser.add_argument("--n-layers", type=int, required=True, help="the model's layers (thirds of them reported)")
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    entries = []
    for path in args.results:
        result = json.loads(path.read_text())
        entries += [{"file": str(path), "sparse_model": result["models"].get("sparse"), **row} for row in overlap(result, args.n_layers)]
    for row in entries:
        print(f"{Path(row['file']).name} {row['task']} [{row['gates']}]: dense {row['dense_heads']}, sparse "
              f"{row['sparse_heads']}, shared {row['shared']}; by layer third {row['heads_by_layer_third']}")
    out = ROOT / "bench" / "results" / f"circuit_head_overlap_{args.tag}.json"
    out.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "entries": entries}, indent=1))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
