"""One Gemma-3-270M attribution graph, ours vs circuit-tracer 0.5.0 (its TransformerLens backend), on CPU in float32:
same converted weights, same CLT (a trained one, circuit-tracer's layout), same token ids and settings.

    python bench/gemma3_vs_circuit_tracer.py --clt /work/runs/gemma3/clt/dense

circuit-tracer runs in its own venv (bench/attribution_vs_circuit_tracer.py's `ensure_ct_venv`; transformers 4.57,
TransformerLens 3.2), and this file is its worker too. TransformerLens knows Gemma-3-270M by its hub name
(`google/gemma-3-270m`, a config written into TransformerLens itself), so the circuit-tracer side builds
`TransformerLensReplacementModel.from_pretrained_and_transcoders("google/gemma-3-270m", clt, hf_model=...)` from our
converted checkpoint (loaded with transformers 4.57 from its safetensors) with the hub offline. As built, its
logits are off (circuit-tracer shares the global layers' RoPE tables with Gemma-3's local layers:
`restore_local_rope` gives them back, and both logit errors are recorded). The dense model only: the graph is checked edge by edge (`compare`: same nodes, |difference| <= 1e-4 of the largest edge).
Writes bench/results/gemma3_vs_circuit_tracer.json with the command and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

PROMPT = 'The opposite of "large" is "'
TL_NAME = "google/gemma-3-270m"


def hf_gemma3(model_dir: Path):
    """Our converted Gemma-3-270M in transformers 4.57 (circuit-tracer's venv): the config rebuilt from our
    config.json's numbers, the weights loaded from its safetensors, eager attention, eval mode."""
    from safetensors.torch import load_file
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    ours = json.loads((model_dir / "config.json").read_text())
    rope = ours["rope_parameters"]
    config = Gemma3TextConfig(
        vocab_size=ours["vocab_size"], hidden_size=ours["hidden_size"], intermediate_size=ours["intermediate_size"],
        num_hidden_layers=ours["num_hidden_layers"], num_attention_heads=ours["num_attention_heads"],
        num_key_value_heads=ours["num_key_value_heads"], head_dim=ours["head_dim"],
        query_pre_attn_scalar=ours["query_pre_attn_scalar"], rms_norm_eps=ours["rms_norm_eps"],
        sliding_window=ours["sliding_window"], layer_types=ours["layer_types"],
        rope_theta=rope["full_attention"]["rope_theta"], rope_local_base_freq=rope["sliding_attention"]["rope_theta"],
        max_position_embeddings=ours["max_position_embeddings"], hidden_activation=ours["hidden_activation"],
        final_logit_softcapping=ours["final_logit_softcapping"], attn_logit_softcapping=ours["attn_logit_softcapping"],
        tie_word_embeddings=ours["tie_word_embeddings"], bos_token_id=ours["bos_token_id"],
        eos_token_id=ours["eos_token_id"], pad_token_id=ours["pad_token_id"], attn_implementation="eager")
    hf = Gemma3ForCausalLM(config)
    missing, unexpected = hf.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"the checkpoint does not match transformers 4.57's Gemma3: missing {missing}, "
                         f"unexpected {unexpected}")
    hf.tie_weights()
    return hf.eval()


def ct_build_model(model_dir: Path, clt_dir: Path):
    """circuit-tracer's replacement model of our converted Gemma-3-270M (`hf_gemma3`) and a CLT."""
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from transformers import AutoTokenizer

    hf = hf_gemma3(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    clt = load_clt(str(clt_dir), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                   dtype=torch.float32, lazy_decoder=False)
    return TransformerLensReplacementModel.from_pretrained_and_transcoders(
        TL_NAME, clt, hf_model=hf, tokenizer=tokenizer, device="cpu", dtype=torch.float32,
        default_prepend_bos=False)


def restore_local_rope(model) -> None:
    """circuit-tracer 0.5.0's `_deduplicate_attention_buffers` gives every layer the last layer's RoPE tables, but
    Gemma-3's local (sliding) layers use base 10k and its global ones 1M (TransformerLens builds them per layer):
    give the local layers theirs back, one shared table, as TransformerLens computes it."""
    cfg = model.cfg
    local = [block.attn for block in model.blocks if block.attn.attn_type == "local"]
    if not local or cfg.rotary_base_local is None:
        return
    sin, cos = local[0].calculate_sin_cos_rotary(cfg.rotary_dim, cfg.n_ctx, base=cfg.rotary_base_local, dtype=cfg.dtype)
    for attn in local:
        attn.rotary_sin, attn.rotary_cos = sin, cos


def worker_ct(job: dict) -> None:
    """circuit-tracer's side, in its venv (imports nothing from this project): load, check the logits against ours,
    one warm-up graph, then the timed graphs; writes their arrays and timings."""
    torch.set_num_threads(job["threads"])
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    result = {"load_seconds": None, "runs": {}}
    started = time.perf_counter()
    try:
        model = ct_build_model(Path(job["model_dir"]), Path(job["clt_dir"]))
    except Exception as error:  # recorded as the measured reason, then re-raised
        result["load_error"] = f"{type(error).__name__}: {error}"
        (out / "ct_result.json").write_text(json.dumps(result, indent=2))
        raise
    result["load_seconds"] = time.perf_counter() - started
    from circuit_tracer import attribute

    tokens = torch.tensor(job["tokens"])
    expected = torch.tensor(job["expected_logits"])
    with torch.no_grad():
        result["max_logit_error_as_built"] = float((model(tokens[None])[0, -1] - expected).abs().max())
    restore_local_rope(model)
    with torch.no_grad():
        result["max_logit_error"] = float((model(tokens[None])[0, -1] - expected).abs().max())
    settings = {"max_n_logits": job["max_n_logits"], "desired_logit_prob": job["desired_logit_prob"],
                "batch_size": job["batch_size"]}
    attribute(tokens, model, max_feature_nodes=job.get("warmup_nodes", 16), **settings)
    for nodes in job["max_feature_nodes"]:
        wall, cpu = time.perf_counter(), time.process_time()
        graph = attribute(tokens, model, max_feature_nodes=nodes, **settings)
        name = "all" if nodes is None else str(nodes)
        np.savez(out / f"ct_{name}.npz", adjacency=graph.adjacency_matrix.numpy(),
                 active_features=graph.active_features.numpy(), selected=graph.selected_features.numpy(),
                 activations=graph.activation_values.numpy(), logit_probs=graph.logit_probabilities.numpy(),
                 logit_tokens=np.array([t.vocab_idx for t in graph.logit_targets]))
        result["runs"][name] = {"wall_seconds": [time.perf_counter() - wall], "cpu_seconds": [time.process_time() - cpu],
                                "n_nodes": int(graph.adjacency_matrix.shape[0])}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "ct_result.json").write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clt", help="a trained CLT directory (circuit-tracer layout) of the dense Gemma-3-270M")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--nodes", default="128", help="max_feature_nodes settings, comma-separated ('all': no cap)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="/tmp/gemma3-vs-ct")
    parser.add_argument("--ct-venv", default="/tmp/gemma-ct/ct-venv")
    parser.add_argument("--timeout", type=int, default=2400, help="seconds per worker process")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "gemma3_vs_circuit_tracer.json")
    parser.add_argument("--worker", choices=("ct",), help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_ct(json.loads(Path(args.job).read_text()))
        return 0
    if not args.clt:
        parser.error("--clt is required")

    from attribution_vs_circuit_tracer import compare, ensure_ct_venv, run_worker

    from attribution.replacement import freeze_prompt, tokenize_prompt
    from sparse_attention.models import GEMMA3_NAME, cache_dir, load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ct_python = ensure_ct_venv(Path(args.ct_venv))
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(GEMMA3_NAME)
    tokens = tokenize_prompt(tokenizer, args.prompt)
    expected_logits = freeze_prompt(model, tokens).logits.tolist()
    del model
    nodes = [None if n == "all" else int(n) for n in args.nodes.split(",")]
    common = {"tokens": tokens, "prompt": args.prompt, "clt_dir": str(Path(args.clt).resolve()), "max_n_logits": 10,
              "desired_logit_prob": 0.95, "batch_size": args.batch_size, "threads": args.threads, "repeats": 1,
              "max_feature_nodes": nodes, "model": GEMMA3_NAME, "variant": "dense"}
    report = {"command": "python " + " ".join(sys.argv), "load_before": os.getloadavg(),
              "settings": {k: common[k] for k in ("max_n_logits", "desired_logit_prob", "batch_size", "threads",
                                                  "clt_dir", "prompt")} | {"n_tokens": len(tokens)}}
    job_ct = {**common, "out_dir": str(work / "ct"), "model_dir": str(cache_dir() / GEMMA3_NAME),
              "expected_logits": expected_logits}
    job_ours = {**common, "out_dir": str(work / "ours")}
    (work / "ours").mkdir(exist_ok=True)
    print("circuit-tracer ...", flush=True)
    try:
        report["ct_process"] = run_worker([str(ct_python), __file__, "--worker", "ct"], job_ct, work / "ct_job.json",
                                          args.timeout)
    except SystemExit as error:  # the worker failed: its stderr is the measured reason
        report["ct_process"] = {"failed": str(error)[-4000:]}
    ct_path = work / "ct" / "ct_result.json"
    report["ct"] = json.loads(ct_path.read_text()) if ct_path.exists() else None
    if report["ct"] and "load_error" not in report["ct"]:
        print("ours ...", flush=True)
        report["ours_process"] = run_worker([sys.executable, str(ROOT / "bench" / "attribution_vs_circuit_tracer.py"),
                                             "--worker", "ours"], job_ours, work / "ours_job.json", args.timeout)
        report["ours"] = json.loads((work / "ours" / "ours_result.json").read_text())
        report["checks"] = {name: compare(work / "ours" / f"ours_{name}.npz", work / "ct" / f"ct_{name}.npz")
                            for name in report["ours"]["runs"]}
    report["load_after"] = os.getloadavg()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report.get(k) for k in ("checks", "ct_process")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
