"""Attribution graphs, ours vs circuit-tracer (PyPI 0.5.0), side by side on CPU in float32.

    .venv/bin/python bench/attribution_vs_circuit_tracer.py                 # SmolLM2-135M, the full run
    .venv/bin/python bench/attribution_vs_circuit_tracer.py --model tiny    # a quick check on a tiny Llama

Same model weights, same CLT (exported in circuit-tracer's layout), same token ids and settings
(max_n_logits 10, desired_logit_prob 0.95, batch_size 16) for both; the dense model and a gated
sparse one (a sparsify checkpoint with --sparse-model, else the dense weights with one gate offset
per head calibrated to --open-fraction, which is only good for timing). circuit-tracer runs in its own
venv (built here on first use: it pins transformers <= 4.57.3; this file is its worker too, importing
nothing from the project there), with its TransformerLens backend and the gates applied to its
attention patterns. Each side runs in a fresh process per variant, so its peak
RSS is its own. Measured: seconds per prompt at 1024 feature nodes and at all, agreement of the two
graphs, peak memory, stored bytes per graph vs circuit-tracer's .pt, and the latency of "top 100
edges of one graph" in a store of >= 1000 graphs. Results go to bench/results/attribution_vs_circuit_tracer.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "When Mary and John went to the store, John gave a drink to"
TINY_SHAPE = {"n_layers": 4, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_mlp": 128, "seed": 0}


# ---------------------------------------------------------------------------------------------- setup
def ensure_ct_venv(venv: Path) -> Path:
    """circuit-tracer's own venv (torch 2.13.0 pinned, circuit-tracer 0.5.0); built on first use, ~2 minutes."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import circuit_tracer"], capture_output=True).returncode == 0:
        return python
    print(f"building circuit-tracer venv in {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    (venv / "constraints.txt").write_text("torch==2.13.0\n")
    subprocess.run([*pip, "-c", str(venv / "constraints.txt"), "circuit-tracer==0.5.0"], check=True)
    return python


def load_lm(args):
    from sparse_attention.models import TinyModelConfig, load_model

    if args.model == "tiny":
        return load_model("tiny", tiny=TinyModelConfig(**TINY_SHAPE))
    return load_model(args.model)


def export_model(hf_model, tokenizer, out: Path) -> None:
    """Config numbers, weights and tokenizer.json: what the circuit-tracer side rebuilds the model from."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    spec = {"vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "d_mlp": cfg.intermediate_size,
            "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": float(rope), "tied": bool(cfg.tie_word_embeddings),
            "special_tokens": {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "pad_token")
                               if getattr(tokenizer, k) is not None}}
    (out / "bench_model.json").write_text(json.dumps(spec, indent=2))
    state = {k: v.detach().float().contiguous().clone() for k, v in hf_model.state_dict().items()
             if not (spec["tied"] and k == "lm_head.weight")}
    save_file(state, str(out / "model.safetensors"))
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"  # transformers 4.57 knows no "TokenizersBackend"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("backend", None)
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2))


def calibrated_clt(weights, frozen, n_features: int, density: float, seed: int):
    """A random CLT whose per-layer thresholds make `density` of features fire on the prompt."""
    from transcoders.clt import CLTConfig, CrossLayerTranscoder

    L, d = weights.n_layers, weights.d_model
    g = torch.Generator().manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=L, d_model=d, n_features=n_features), init=False)
    with torch.no_grad():
        clt.W_enc.copy_(torch.randn(L, n_features, d, generator=g) / d**0.5)
        clt.b_enc.zero_()
        for w in clt.W_dec:
            w.copy_(torch.randn(w.shape, generator=g) * 0.02)
        clt.b_dec.zero_()
        pre = torch.einsum("lpd,lfd->lpf", frozen.mlp_in, clt.W_enc)[:, 1:].reshape(L, -1)
        clt.threshold.copy_(torch.quantile(pre, 1 - density, dim=1)[:, None].expand(L, n_features))
    return clt.eval()


def calibrated_offsets(model, tokens, open_fraction: float):
    """A gated copy of `model` with one offset for all heads, bisected so `open_fraction` of causal
    gates open on the prompt (untrained: for timing only)."""
    from attribution.replacement import freeze_prompt
    from sparse_attention.gated_attention import GatedModel

    gated = GatedModel(copy.deepcopy(model), offset_init=0.0).eval().set_mode("eval")  # keeps `model` dense
    n = len(tokens)
    pairs = gated.n_layers * gated.n_heads * n * (n + 1) / 2
    low, high = -40.0, 10.0
    for _ in range(30):
        mid = (low + high) / 2
        with torch.no_grad():
            gated.offsets.fill_(mid)
        fraction = float((freeze_prompt(gated, tokens).patterns != 0).sum()) / pairs
        low, high = (mid, high) if fraction < open_fraction else (low, mid)
    with torch.no_grad():
        gated.offsets.fill_(high)
    return gated


# ---------------------------------------------------------------------------------------------- circuit-tracer's side
def ct_build_model(model_dir: Path, clt_dir: Path):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = json.loads((model_dir / "bench_model.json").read_text())
    hf_config = LlamaConfig(
        vocab_size=spec["vocab_size"], hidden_size=spec["d_model"], intermediate_size=spec["d_mlp"],
        num_hidden_layers=spec["n_layers"], num_attention_heads=spec["n_heads"],
        num_key_value_heads=spec["n_kv_heads"], max_position_embeddings=spec["max_position_embeddings"],
        rms_norm_eps=spec["rms_norm_eps"], rope_theta=spec["rope_theta"], tie_word_embeddings=spec["tied"],
        hidden_act="silu", attention_bias=False,
    )
    hf = LlamaForCausalLM(hf_config)
    state = load_file(str(model_dir / "model.safetensors"))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"model export does not match: missing {missing}, unexpected {unexpected}")
    if spec["tied"]:
        hf.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), **spec["special_tokens"])
    d_head = spec["d_model"] // spec["n_heads"]
    cfg = HookedTransformerConfig(
        d_model=spec["d_model"], d_head=d_head, n_heads=spec["n_heads"], d_mlp=spec["d_mlp"],
        n_layers=spec["n_layers"], n_ctx=min(spec["max_position_embeddings"], 1024), eps=spec["rms_norm_eps"],
        d_vocab=spec["vocab_size"], act_fn="silu",
        n_key_value_heads=spec["n_kv_heads"] if spec["n_kv_heads"] != spec["n_heads"] else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, final_rms=True, gated_mlp=True, rotary_base=spec["rope_theta"],
        original_architecture="LlamaForCausalLM", default_prepend_bos=False, dtype=torch.float32, device="cpu",
    )
    model = TransformerLensReplacementModel(cfg, tokenizer)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    clt = load_clt(str(clt_dir), feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                   dtype=torch.float32, lazy_decoder=False)
    model._configure_replacement_model(clt)
    return model


def ct_add_gates(model, masks: torch.Tensor) -> None:
    """Multiply every attention pattern by the frozen gate mask [L, H, P, P] (the gated model's rule:
    softmax over causal keys, times the hard gate, not renormalised)."""
    for layer in range(masks.shape[0]):
        def gate(pattern, hook, layer=layer):
            return pattern * masks[layer].to(pattern.dtype)
        model.add_hook(f"blocks.{layer}.attn.hook_pattern", gate, is_permanent=True)


def worker_ct(job: dict) -> None:
    """circuit-tracer's side of one variant; runs in circuit-tracer's venv and imports nothing from
    this project (transformers 4.57 there): builds the TransformerLens replacement model by hand
    (`ct_build_model`), times `attribute()`, writes the graph arrays, .pt and timings."""
    torch.set_num_threads(job["threads"])
    out = Path(job["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    from circuit_tracer import attribute
    from safetensors.torch import load_file

    started = time.perf_counter()
    model = ct_build_model(Path(job["model_dir"]), Path(job["clt_dir"]))
    if job.get("masks"):
        ct_add_gates(model, load_file(job["masks"])["masks"])
    load_seconds = time.perf_counter() - started
    tokens = torch.tensor(job["tokens"])
    with torch.no_grad():
        logits = model(tokens[None])[0, -1]
    expected = torch.tensor(job["expected_logits"])
    result = {"load_seconds": load_seconds, "max_logit_error": float((logits - expected).abs().max()), "runs": {}}
    settings = {"max_n_logits": job["max_n_logits"], "desired_logit_prob": job["desired_logit_prob"],
                "batch_size": job["batch_size"]}
    attribute(tokens, model, max_feature_nodes=job.get("warmup_nodes", 16), **settings)  # warm-up
    for nodes in job["max_feature_nodes"]:
        walls, cpus = [], []
        for _ in range(job["repeats"]):
            wall, cpu = time.perf_counter(), time.process_time()
            graph = attribute(tokens, model, max_feature_nodes=nodes, **settings)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        name = "all" if nodes is None else str(nodes)
        np.savez(out / f"ct_{name}.npz", adjacency=graph.adjacency_matrix.numpy(),
                 active_features=graph.active_features.numpy(), selected=graph.selected_features.numpy(),
                 activations=graph.activation_values.numpy(), logit_probs=graph.logit_probabilities.numpy(),
                 logit_tokens=np.array([t.vocab_idx for t in graph.logit_targets]))
        graph.to_pt(str(out / f"ct_{name}.pt"))
        result["runs"][name] = {"wall_seconds": walls, "cpu_seconds": cpus,
                                "pt_bytes": (out / f"ct_{name}.pt").stat().st_size,
                                "n_nodes": int(graph.adjacency_matrix.shape[0])}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "ct_result.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------- our side
def worker_ours(job: dict) -> None:
    """Our side of one variant, in a fresh process: timings, graph arrays, store bytes, peak RSS."""
    from attribution.config import AttributionStageConfig, GraphConfig
    from attribution.graph import attribute
    from attribution.heads import edges_to_load, head_loadings
    from attribution.nodes import build_replacement, transcoder_weights
    from attribution.prune import prune
    from attribution.qk import qk_attribution
    from attribution.records import GraphRecord, edges_table, from_frame, graphs_table, nodes_table
    from attribution.replacement import extract_weights, freeze_prompt
    from attribution.stage import kept_edges
    from attribution.store import open_store
    from sparse_attention.gated_attention import GatedModel, load_gated_model
    from transcoders.clt import load_clt

    torch.set_num_threads(job["threads"])
    started = time.perf_counter()
    args = argparse.Namespace(model=job["model"])
    if job.get("sparse_model"):
        model, _ = load_gated_model(job["sparse_model"])
    else:
        model, _ = load_lm(args)
        if job.get("offsets"):
            model = GatedModel(model, 0.0).eval().set_mode("eval")
            with torch.no_grad():
                model.offsets.copy_(torch.tensor(job["offsets"]))
    weights = extract_weights(model)
    clt = transcoder_weights(load_clt(job["clt_dir"]), weights)
    tokens = job["tokens"]
    load_seconds = time.perf_counter() - started
    out = Path(job["out_dir"])
    result = {"load_seconds": load_seconds, "runs": {}}

    def graph_for(nodes):
        config = GraphConfig(max_n_logits=job["max_n_logits"], desired_logit_prob=job["desired_logit_prob"],
                             batch_size=job["batch_size"], max_feature_nodes=nodes)
        frozen = freeze_prompt(model, tokens)
        lrm = build_replacement(weights, clt, frozen, config.max_n_logits, config.desired_logit_prob)
        return lrm, attribute(lrm, config, prompt=job["prompt"]), config

    graph_for(job.get("warmup_nodes", 16))  # warm-up
    for nodes in job["max_feature_nodes"]:
        walls, cpus = [], []
        for _ in range(job["repeats"]):
            wall, cpu = time.perf_counter(), time.process_time()
            lrm, graph, config = graph_for(nodes)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        name = "all" if nodes is None else str(nodes)
        stage = AttributionStageConfig(graph=config)
        extras, clock = {}, time.perf_counter()
        pruned = prune(graph.adjacency, graph.logit_probs, graph.n_selected, graph.n_pos)
        extras["prune"] = time.perf_counter() - clock
        clock = time.perf_counter()
        targets, sources = edges_to_load(graph, *kept_edges(graph, pruned), stage.attention.edge_influence_share)
        loadings = head_loadings(lrm, graph, targets, sources, stage.attention)
        extras["head_loadings"] = time.perf_counter() - clock
        clock = time.perf_counter()
        qk = qk_attribution(lrm, loadings, stage.attention)
        extras["qk"] = time.perf_counter() - clock
        sizes = {}
        for stored in ("pruned", "all"):
            clock = time.perf_counter()
            graph_id = f"{job['variant']}-{name}-{stored}"
            record = GraphRecord(graph_id, job["variant"], {
                "graphs": graphs_table(graph_id, job["variant"], graph, pruned, token_strings=[], model=job["model"],
                                       clt=job["clt_dir"], settings="{}", edges_stored=stored, seconds=walls[-1]),
                "nodes": nodes_table(graph_id, graph, pruned),
                "edges": edges_table(graph_id, graph, pruned, stored),
                "head_loadings": from_frame("head_loadings", graph_id, loadings),
                "qk_pairs": from_frame("qk_pairs", graph_id, qk),
            })
            store = open_store(out / "store")
            store.write(record)
            extras[f"record_and_write_{stored}"] = time.perf_counter() - clock
            sizes[stored] = sum((out / "store" / table / f"variant={job['variant']}" / f"{graph_id}.parquet"
                                 ).stat().st_size for table in record.tables)
        np.savez(out / f"ours_{name}.npz", adjacency=graph.adjacency.numpy(),
                 active_features=graph.active_features.numpy(), selected=graph.selected.numpy(),
                 logit_tokens=graph.logit_tokens.numpy(), logit_probs=graph.logit_probs.numpy())
        result["runs"][name] = {
            "wall_seconds": walls, "cpu_seconds": cpus, "extras_seconds": extras, "store_bytes": sizes,
            "n_nodes": graph.n_nodes, "n_active": len(graph.active_features),
            "n_kept_nodes": int(pruned.node_mask.sum()), "n_head_loading_rows": len(loadings),
            "n_qk_rows": len(qk)}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "ours_result.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------- checks
def compare(ours: Path, ct: Path) -> dict:
    """Same nodes? Edge weights within 1e-4 of the largest?"""
    a, b = np.load(ours), np.load(ct)
    same_active = a["active_features"].shape == b["active_features"].shape and (
        a["active_features"] == b["active_features"]).all()
    sel_a = {tuple(r) for r in a["active_features"][a["selected"]].tolist()}
    sel_b = {tuple(r) for r in b["active_features"][b["selected"]].tolist()}
    result = {"same_active_features": bool(same_active), "same_logit_tokens": a["logit_tokens"].tolist() ==
              b["logit_tokens"].tolist(), "same_selected_features": sel_a == sel_b,
              "selected_overlap": len(sel_a & sel_b) / max(1, len(sel_a | sel_b))}
    if result["same_selected_features"] and result["same_logit_tokens"] and a["adjacency"].shape == b["adjacency"].shape:
        diff = np.abs(a["adjacency"] - b["adjacency"])
        scale = float(np.abs(b["adjacency"]).max())
        result.update(max_abs_diff=float(diff.max()), max_abs_edge=scale, max_rel_diff=float(diff.max()) / scale,
                      edges_within_1e4=bool(np.allclose(a["adjacency"], b["adjacency"], rtol=1e-4,
                                                        atol=1e-4 * scale)))
    return result


def store_latency(work: Path, n_graphs: int, queries: int) -> dict:
    """Latency of top_edges(k=100) in a store of n_graphs graphs (copies of the benchmark's graphs)."""
    import pyarrow as pa

    from attribution.schema import TABLES
    from attribution.store import GraphStore, open_store

    sources = sorted(work.glob("*/ours/store"))
    store = open_store(work / "latency_store")
    existing = len(store.list_graphs())
    templates = []
    for source in sources:
        src = open_store(source)
        for graph_id in src.list_graphs()["graph_id"]:
            if not graph_id.endswith("-pruned"):  # the stage's default: kept edges only
                continue
            variant = src.variant_of(graph_id)
            templates.append((variant, {t: pa.Table.from_pandas(src.read_table(t, graph_id), schema=TABLES[t],
                                                                 preserve_index=False) for t in TABLES}))
    from attribution.records import GraphRecord

    clock = time.perf_counter()
    for i in range(existing, n_graphs):
        variant, tables = templates[i % len(templates)]
        graph_id = f"g{i:06d}"
        copies = {t: table.set_column(0, "graph_id", pa.array([graph_id] * len(table), pa.string()))
                  for t, table in tables.items()}
        store.write(GraphRecord(graph_id, variant, copies))
    write_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    ids = sorted(store.list_graphs()["graph_id"])
    list_seconds = time.perf_counter() - clock
    rng = random.Random(0)
    cold, warm = [], []
    warm_store = GraphStore(work / "latency_store")
    for graph_id in rng.sample(ids, min(queries, len(ids))):
        clock = time.perf_counter()
        top = open_store(work / "latency_store").top_edges(graph_id, k=100)
        cold.append(time.perf_counter() - clock)
        clock = time.perf_counter()
        warm_store.top_edges(graph_id, k=100)
        warm.append(time.perf_counter() - clock)
        assert len(top) == min(100, len(top))
    def summary(times: list[float]) -> dict:
        times = sorted(1e3 * t for t in times)
        return {"median": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))], "max": times[-1]}

    return {"n_graphs": len(ids), "write_seconds_for_new": write_seconds, "list_graphs_seconds": list_seconds,
            "cold_ms": summary(cold), "warm_ms": summary(warm)}


# ---------------------------------------------------------------------------------------------- main
def run_worker(command: list[str], job: dict, job_path: Path, timeout: int) -> dict:
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job))
    started = time.perf_counter()
    proc = subprocess.run([*command, str(job_path)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(f"{command[-1]} failed:\n{proc.stderr[-4000:]}")
    return {"process_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help='"smollm2-135m" or "tiny"')
    parser.add_argument("--sparse-model", help="a gated checkpoint (sparsify's model/) with the same architecture")
    parser.add_argument("--open-fraction", type=float, default=0.01, help="synthetic gates: share of open gates")
    parser.add_argument("--clt-dense", help="a trained CLT directory (circuit-tracer layout) for the dense variant")
    parser.add_argument("--clt-sparse", help="a trained CLT directory for the sparse variant")
    parser.add_argument("--tag", default="", help="suffix of the result files, e.g. _trained")
    parser.add_argument("--features", type=int, default=256, help="random CLT: features per layer")
    parser.add_argument("--density", type=float, default=0.02, help="random CLT: share of features active")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--nodes", default="1024,all", help="max_feature_nodes settings, comma-separated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--variants", default="dense,sparse")
    parser.add_argument("--store-graphs", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/attribution-bench")
    parser.add_argument("--ct-venv", help="circuit-tracer's venv (default: WORK/ct-venv, built on first use)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    parser.add_argument("--worker", choices=("ours", "ct"), help=argparse.SUPPRESS)
    parser.add_argument("job", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        {"ours": worker_ours, "ct": worker_ct}[args.worker](json.loads(Path(args.job).read_text()))
        return 0

    from attribution.replacement import extract_weights, freeze_prompt, tokenize_prompt
    from transcoders.clt import save_clt

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ct_python = ensure_ct_venv(Path(args.ct_venv) if args.ct_venv else work / "ct-venv")
    torch.set_num_threads(args.threads)
    model, tokenizer = load_lm(args)
    tokens = tokenize_prompt(tokenizer, args.prompt)
    weights = extract_weights(model)
    dense_frozen = freeze_prompt(model, tokens)
    clt_dir = work / "clt"
    save_clt(calibrated_clt(weights, dense_frozen, args.features, args.density, seed=0), clt_dir)
    nodes = [None if n == "all" else int(n) for n in args.nodes.split(",")]
    common = {"tokens": tokens, "prompt": args.prompt, "clt_dir": str(clt_dir), "max_n_logits": 10,
              "desired_logit_prob": 0.95, "batch_size": args.batch_size, "threads": args.threads,
              "repeats": args.repeats, "max_feature_nodes": nodes, "model": args.model}
    report = {"machine": {"threads": args.threads, "cpus": os.cpu_count(), "load_before": os.getloadavg()},
              "settings": {k: common[k] for k in ("max_n_logits", "desired_logit_prob", "batch_size", "threads",
                                                  "repeats")} | {"model": args.model, "n_tokens": len(tokens),
                                                                  "clt_features": args.features,
                                                                  "clt_density": args.density},
              "variants": {}}
    for variant in args.variants.split(","):
        from safetensors.torch import save_file

        vdir = work / variant
        trained = {"dense": args.clt_dense, "sparse": args.clt_sparse}[variant]
        variant_clt = {"clt_dir": str(Path(trained).resolve())} if trained else {}
        job_ours = {**common, **variant_clt, "variant": variant, "out_dir": str(vdir / "ours")}
        job_ct = {**common, **variant_clt, "out_dir": str(vdir / "ct"), "model_dir": str(vdir / "model")}
        info = {"clt": variant_clt.get("clt_dir", f"random, {args.features} features per layer")}
        if variant == "dense":
            export_model(model, tokenizer, vdir / "model")
            frozen = dense_frozen
        else:
            if args.sparse_model:
                from sparse_attention.gated_attention import load_gated_model

                gated, _ = load_gated_model(args.sparse_model)
                job_ours["sparse_model"] = args.sparse_model
                info["source"] = args.sparse_model
            else:
                gated = calibrated_offsets(model, tokens, args.open_fraction)
                job_ours["offsets"] = gated.offsets.tolist()
                info["source"] = f"dense weights, synthetic offset {gated.offsets[0, 0].item():.3f}"
            export_model(gated.model, tokenizer, vdir / "model")
            frozen = freeze_prompt(gated, tokens)
            save_file({"masks": (frozen.patterns != 0).float().contiguous()}, str(vdir / "masks.safetensors"))
            job_ct["masks"] = str(vdir / "masks.safetensors")
            n = len(tokens)
            info["open_fraction"] = float((frozen.patterns != 0).sum()) / (frozen.patterns.shape[0] *
                                                                           frozen.patterns.shape[1] * n * (n + 1) / 2)
        job_ct["expected_logits"] = frozen.logits.tolist()
        print(f"[{variant}] circuit-tracer ...", flush=True)
        info["ct_process"] = run_worker([str(ct_python), __file__, "--worker", "ct"], job_ct,
                                        vdir / "ct_job.json", args.timeout)
        print(f"[{variant}] ours ...", flush=True)
        info["ours_process"] = run_worker([sys.executable, __file__, "--worker", "ours"], job_ours,
                                          vdir / "ours_job.json", args.timeout)
        ct = json.loads((vdir / "ct" / "ct_result.json").read_text())
        ours = json.loads((vdir / "ours" / "ours_result.json").read_text())
        info.update(ct=ct, ours=ours, checks={}, speedup={})
        for name in ours["runs"]:
            info["checks"][name] = compare(vdir / "ours" / f"ours_{name}.npz", vdir / "ct" / f"ct_{name}.npz")
            info["speedup"][name] = min(ct["runs"][name]["wall_seconds"]) / min(ours["runs"][name]["wall_seconds"])
        report["variants"][variant] = info
        print(f"[{variant}] speedup {info['speedup']}, checks {info['checks']}", flush=True)
    report["store_latency"] = store_latency(work, args.store_graphs, queries=200)
    report["machine"]["load_after"] = os.getloadavg()
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.model == "smollm2-135m" else f"_{args.model}") + args.tag
    (results / f"attribution_vs_circuit_tracer{suffix}.json").write_text(json.dumps(report, indent=2))
    (results / f"attribution_vs_circuit_tracer{suffix}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Attribution vs circuit-tracer ({s['model']}, {s['n_tokens']} tokens, CLT {s['clt_features']} "
             f"features/layer, {s['threads']} threads, load avg before {report['machine']['load_before'][0]:.1f})", "",
             "| variant | nodes | circuit-tracer s (cpu s) | ours s (cpu s) | speedup | same nodes | max rel diff | "
             "peak RSS CT / ours MB | CT .pt / our store (pruned, all) KB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, info in report["variants"].items():
        for name, run in info["ours"]["runs"].items():
            ct_run, check = info["ct"]["runs"][name], info["checks"][name]
            lines.append(
                f"| {variant} | {name} | {min(ct_run['wall_seconds']):.2f} ({min(ct_run['cpu_seconds']):.2f}) | "
                f"{min(run['wall_seconds']):.2f} ({min(run['cpu_seconds']):.2f}) | {info['speedup'][name]:.1f}x | "
                f"{check['same_selected_features'] and check['same_logit_tokens']} | "
                f"{check.get('max_rel_diff', float('nan')):.1e} | {info['ct']['peak_rss_mb']:.0f} / "
                f"{info['ours']['peak_rss_mb']:.0f} | {ct_run['pt_bytes'] / 1024:.0f} / "
                f"{run['store_bytes']['pruned'] / 1024:.0f}, {run['store_bytes']['all'] / 1024:.0f} |")
    lat = report["store_latency"]
    lines += ["", f"top 100 edges of one graph, store of {lat['n_graphs']} graphs: cold (new store object) median "
              f"{lat['cold_ms']['median']:.1f} ms, p95 {lat['cold_ms']['p95']:.1f} ms, max {lat['cold_ms']['max']:.1f} ms; "
              f"warm median {lat['warm_ms']['median']:.1f} ms, p95 {lat['warm_ms']['p95']:.1f} ms; "
              f"list_graphs {lat['list_graphs_seconds']:.2f} s", ""]
    for variant, info in report["variants"].items():
        lines.append(f"{variant}: {info.get('source', 'original weights')}; CLT {info.get('clt', 'random')}"
                     + (f", open gates {info['open_fraction']:.4f}" if "open_fraction" in info else "")
                     + "; extras (ours, s): " + json.dumps({k: {e: round(v, 2) for e, v in r['extras_seconds'].items()}
                                                            for k, r in info['ours']['runs'].items()}))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
