"""The pipeline: presets end to end (embedded Ray and in-process), the artifact store, kill and resume,
clear errors, and `ray job submit` against a local head."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attribution.frontend import to_networkx
from attribution.store import open_store
from pipeline import run as run_module
from pipeline.artifacts import MANIFEST, ArtifactError
from pipeline.config import load_config
from pipeline.orchestrate import run_pipeline
from pipeline.stages import STAGES
from transcoders.features import open_features

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "pipeline" / "run.py")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


def metrics_without_timings(path: Path) -> dict:
    metrics = json.loads(path.read_text())
    metrics.pop("history")
    for key in [k for k in metrics if "seconds" in k or k == "peak_rss_gb"]:  # timings and process memory vary
        metrics.pop(key)
    return metrics


def test_tiny_preset_with_embedded_ray(tmp_path):
    """Every stage of the tiny preset through embedded Ray, each output checked."""
    config = load_config(preset="tiny")
    n_prompts = len(config.attribution.prompts) + sum(config.attribution.prompt_sets.values())
    results = run_pipeline(config, ["sparsify", "clt", "features", "attribution", "compare"], str(tmp_path),
                           progress=False)
    assert sorted(results) == sorted(STAGES)
    assert all(result["skipped"] is False for result in results.values())
    manifest = json.loads((tmp_path / "sparsify" / MANIFEST).read_text())
    assert manifest["summary"]["edge_fraction"] < 0.5
    assert (tmp_path / "sparsify" / "model" / "gate.safetensors").exists()
    for variant in ("dense", "sparse"):
        metrics = json.loads((tmp_path / "clt" / variant / "metrics.json").read_text())
        for key in ("nmse_per_layer", "l0_per_layer", "dead_fraction", "ce_clean", "ce_replaced", "ce_zero_ablated"):
            assert key in metrics, (variant, key)
        assert len(metrics["nmse_per_layer"]) == config.sparsify.model.tiny.n_layers
        assert (tmp_path / "clt" / variant / "W_enc_0.safetensors").exists()
        summary = json.loads((tmp_path / "graphs" / "_stages" / variant / MANIFEST).read_text())["summary"]
        assert summary["graphs"] == n_prompts and summary["failures"] == []

    store = open_store(tmp_path / "graphs")
    graphs = store.list_graphs()
    assert sorted(graphs["variant"].unique()) == ["dense", "sparse"]
    assert len(graphs) == 2 * n_prompts
    for variant in ("dense", "sparse"):  # each CLT has dashboards, and its graphs' feature nodes their labels
        labels = open_features(tmp_path / "clt" / variant).labels()
        features = [node for graph_id in graphs.loc[graphs["variant"] == variant, "graph_id"]
                    for _, node in to_networkx(store.load_graph(graph_id)).nodes(data=True) if node["kind"] == "feature"]
        assert features and all(n["label"] == labels[(n["layer"], n["feature"])] for n in features)
    comparison = tmp_path / "comparison"
    assert (comparison / "report.html").is_file() and (comparison / "task_summary.parquet").is_file()


def test_done_stage_is_skipped_and_foreign_key_is_refused(tmp_path):
    config = load_config(preset="tiny", overrides=["sparsify.train.steps=10"])
    run_pipeline(config, ["sparsify"], str(tmp_path), executor="local", progress=False)
    metrics = tmp_path / "sparsify" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    threads = torch.get_num_threads()
    two_cpus = load_config(preset="tiny", overrides=["sparsify.train.steps=10", "resources.stages.sparsify.num_cpus=2"])
    again = run_pipeline(two_cpus, ["sparsify"], str(tmp_path), executor="local", progress=False)
    assert again["sparsify"]["skipped"] is True and metrics.stat().st_mtime_ns == stamp
    assert torch.get_num_threads() == threads  # the stage's thread count does not outlive it in the caller
    changed = load_config(preset="tiny", overrides=["sparsify.train.steps=5"])
    with pytest.raises(ArtifactError, match="different config"):
        run_pipeline(changed, ["sparsify"], str(tmp_path), executor="local", progress=False)
    assert metrics.stat().st_mtime_ns == stamp  # nothing computed was lost
    forced = run_pipeline(changed, ["sparsify"], str(tmp_path), force=["sparsify"], executor="local", progress=False)
    assert forced["sparsify"]["skipped"] is False
    assert json.loads(metrics.read_text())["train_steps"] == 5


def test_ctrl_c_stops_embedded_ray_stages_and_says_how_to_resume(tmp_path):
    args = ["--preset", "tiny", "--stages", "sparsify", "--quiet", "--set", "sparsify.train.steps=400",
            "--set", "sparsify.train.checkpoint_every=20", "--output", str(tmp_path)]
    run = subprocess.Popen(RUN + args, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        checkpoint = tmp_path / "sparsify" / "checkpoints" / "train_state.pt"
        deadline = time.time() + 300
        while not checkpoint.exists() and time.time() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert checkpoint.exists(), "the stage never checkpointed"
        run.send_signal(signal.SIGINT)  # what Ctrl-C sends to the driver
        assert run.wait(timeout=120) == 130
        assert "rerun the same command to resume" in run.stderr.read()
        assert not (tmp_path / "sparsify" / MANIFEST).exists()
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()


def test_kill_mid_stage_then_resume_equals_uninterrupted(tmp_path):
    """SIGKILL in the sparsify stage at its first checkpoint (step 20 of 100), then a rerun: it resumes to the
    metrics of an uninterrupted run (the stage alone: every assertion reads its outputs)."""
    args = ["--preset", "tiny", "--stages", "sparsify", "--executor", "local", "--quiet",
            "--set", "sparsify.train.steps=100", "--set", "sparsify.train.checkpoint_every=20"]
    straight = subprocess.run(RUN + args + ["--output", str(tmp_path / "a")], env=ENV, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    killed = subprocess.Popen(RUN + args + ["--output", str(tmp_path / "b")], env=ENV, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "b" / "sparsify" / "checkpoints" / "train_state.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists(), "the run never reached its first checkpoint"
    assert not (tmp_path / "b" / "sparsify" / MANIFEST).exists()  # a killed stage never reads as done
    resumed = subprocess.run(RUN + args + ["--output", str(tmp_path / "b")], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_without_timings(tmp_path / "b" / "sparsify" / "metrics.json") == metrics_without_timings(
        tmp_path / "a" / "sparsify" / "metrics.json")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "unknown preset"),
        (["--preset", "tiny", "--stages", "bogus"], "unknown stage"),
        (["--preset", "tiny", "--set", "sparsify.train.steps=-1"], "sparsify.train.steps"),
        (["--preset", "tiny", "--set", "sparsify.model.name=not-a-model", "--executor", "local"], "not-a-model"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path, args, message, capsys):
    """In-process (the command line's `main`): a real process's exit and its stderr are
    test_pipeline_guards.test_stage_exception_is_one_error_line's."""
    assert run_module.main(args + ["--output", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1, stderr


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert run_module.main(["--preset", "tiny", "--output", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_unreachable_ray_address_is_a_clear_error(tmp_path):
    env = {**ENV, "RAY_ADDRESS": "127.0.0.1:1"}
    result = subprocess.run(RUN + ["--preset", "tiny", "--output", str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "cannot connect to Ray" in result.stderr


def test_ray_job_submit_on_a_local_head(tmp_path):
    """`ray job submit --working-dir .` against a head on loopback, on free ports, with token authentication
    (a client without the token is refused). The job runs one short stage: every stage through Ray is
    test_tiny_preset_with_embedded_ray's. The head runs in its own process group (`ray start --block`),
    which the test kills: `ray stop` would kill every Ray on the machine."""
    ray_bin = Path(sys.executable).parent / "ray"
    token = secrets.token_hex(32)
    env = {**ENV, "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    dashboard_port = _free_port()
    # every port of its own: another Ray on the machine (an embedded one, another test's head) holds the defaults
    ports = [f"--{name}={_free_port()}" for name in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                                     "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                     "metrics-export-port")]
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
                             "--disable-usage-stats", *ports], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_port(dashboard_port, head, timeout_s=180)
        output = tmp_path / "job"
        deadline = time.monotonic() + 180
        while True:  # the dashboard answers before its job agent is up: "No available agent", retried
            submit = subprocess.run(
                [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO),
                 "--", "python", "pipeline/run.py", "--preset", "tiny", "--stages", "sparsify", "--quiet",
                 "--set", "sparsify.train.steps=10", "--output", str(output)],
                env=env, capture_output=True, text=True, timeout=600, cwd=REPO,
            )
            if "No available agent" not in submit.stdout + submit.stderr or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "pipeline finished" in submit.stdout
        assert json.loads((output / "sparsify" / MANIFEST).read_text())["stage"] == "sparsify"
        for auth, refusal in ((("disabled", ""), "Missing authentication token"),
                              (("token", secrets.token_hex(32)), "Invalid authentication token")):
            stranger = subprocess.run([str(ray_bin), "job", "list", "--address", address], capture_output=True,
                                      text=True, timeout=120,
                                      env={**env, "RAY_AUTH_MODE": auth[0], "RAY_AUTH_TOKEN": auth[1]})
            assert stranger.returncode != 0 and refusal in stranger.stderr, stranger.stderr[-2000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block stops the processes it started on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ray start exited with {process.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")
