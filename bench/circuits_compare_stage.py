"""The compare stage's component circuits in the demo's configuration, timed per phase (CPU seconds).

Reads `compare.circuits` of pipeline/presets/demo.yaml (its tasks, prompts per task, the circuit config) and
traces each task's circuit on the dense model and on `--sparse` (a gated checkpoint, both gate modes), or on
the dense model twice (`--sparse dense`: a model without gates is traced once per variant) or once (`--sparse
none`) -- the work
`comparison.summaries.run_circuits` does. Per circuit: CPU seconds per phase (`CircuitResult.cpu_seconds`:
record, edge_ranking, head_patching, heads_curve, edges_curve, role_edges_curve, faithfulness), wall seconds,
and the counts at the target. Writes --out (bench/results/circuits_compare_stage.json) with the command, the
load, the machine and the sparse checkpoint's gate.json (bench/gated_untrained.py marks an untrained one).
Usage: nice -n 5 python bench/circuits_compare_stage.py [--tasks ioi antonyms] --sparse DIR [--threads 1]
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

from circuits.config import CURVE_KINDS  # noqa: E402
from circuits.curves import gate_modes, run_prepared  # noqa: E402
from circuits.hooks import prepare  # noqa: E402
from comparison.config import CompareConfig  # noqa: E402
from comparison.summaries import task_prompts  # noqa: E402
from sparse_attention.gated_attention import GATE_META_FILE, gate_mode, load_gated_model  # noqa: E402
from sparse_attention.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", help="default: the preset's compare.circuits.tasks, else all five")
    parser.add_argument("--sparse", default="dense", help="gated checkpoint directory, 'dense' (dense twice) or "
                                                          "'none' (the dense circuits alone)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", type=Path, default=ROOT / "pipeline/presets/demo.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/circuits_compare_stage.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    circuits = CompareConfig.model_validate(yaml.safe_load(args.preset.read_text())["compare"]).circuits
    tasks = args.tasks or circuits.tasks or ["ioi", "greater_than", "docstring", "antonyms", "induction"]
    config = circuits.circuit
    models = {"dense": load_model("smollm2-135m")}
    sparse_meta = None
    if args.sparse == "dense":
        models["sparse"] = models["dense"]
    elif args.sparse != "none":
        sparse, tokenizer = load_gated_model(Path(args.sparse))
        models["sparse"] = (sparse.set_mode("eval"), tokenizer)
        meta_path = Path(args.sparse) / GATE_META_FILE
        sparse_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    modes = gate_modes(config, models["sparse"][0]) if "sparse" in models else [config.gates]
    record: dict = {
        "command": "nice -n 5 python bench/circuits_compare_stage.py " + " ".join(sys.argv[1:]),
        "preset": str(args.preset.relative_to(ROOT)), "circuits_config": circuits.model_dump(mode="json"),
        "sparse": args.sparse, "sparse_gate_meta": sparse_meta,
        "tasks": tasks, "threads": args.threads, "machine": "AMD EPYC 2-core AVX2, fp32", "loadavg_start": load_start,
        "circuits": [],
    }
    wall_start, cpu_start = time.perf_counter(), time.process_time()

    def save() -> None:  # after every circuit, so an interrupted run keeps what it measured
        phases: dict[str, float] = {}
        for entry in record["circuits"]:
            for phase, seconds in entry["cpu_s"].items():
                phases[phase] = phases.get(phase, 0.0) + seconds
        record.update(cpu_s_per_phase=phases, cpu_s_total=time.process_time() - cpu_start,
                      wall_s_total=time.perf_counter() - wall_start,
                      loadavg_end=Path("/proc/loadavg").read_text().split()[:3])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    for variant, (model, tokenizer) in models.items():
        for mode in modes if gate_mode(model) == "eval" else modes[:1]:
            prepared = prepare(model, config.split_qkv, config.gate_gradient, mode, config.precision)
            for task in tasks:
                _, prompts, reason = task_prompts(task, tokenizer, circuits.prompts_per_task)
                if reason:
                    raise SystemExit(reason)
                wall = time.perf_counter()
                result = run_prepared(config, prepared, tokenizer, prompts)
                entry = {"task": task, "variant": variant, "gates": mode, "n_prompts": result.n_prompts,
                         "wall_s": time.perf_counter() - wall, "cpu_s": result.cpu_seconds,
                         "cpu_s_total": sum(result.cpu_seconds.values()),
                         "counts": {kind: [curve.count_at_target, curve.count_stays_above, curve.total]
                                    for kind in CURVE_KINDS if (curve := getattr(result, kind)) is not None},
                         "edge_curve_points": {kind: len(curve.counts) for kind in CURVE_KINDS
                                               if (curve := getattr(result, kind)) is not None}}
                record["circuits"].append(entry)
                print(json.dumps(entry), flush=True)
                save()
    print(f"wrote {args.out}: {json.dumps(record['cpu_s_per_phase'])}")


if __name__ == "__main__":
    main()
