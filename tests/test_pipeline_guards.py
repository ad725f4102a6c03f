"""The pipeline's guards: one run per output (stage locks), finished stages checked against their manifests'
hashes, one error line per failure, strict config types, content keys (a forced attribution replaces its
variant's graphs), and reruns on a read-only finished output."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attribution.store import open_store
from pipeline import run as run_module
from pipeline.artifacts import MANIFEST
from pipeline.config import ConfigError, load_config
from pipeline.locks import OutputLockedError, OutputLocks
from pipeline.orchestrate import run_pipeline

REPO = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(REPO / "pipeline" / "run.py")]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
FAST = ["sparsify.train.steps=4", "sparsify.train.checkpoint_every=4", "sparsify.eval.heldout_blocks=4",
        "sparsify.eval.long_blocks=1", "clt.train.steps=20", "clt.eval.heldout_blocks=4",
        "attribution.prompt_sets={}"]
STAGES = "sparsify,clt,attribution"


def fast_args(output: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--executor", "local", "--quiet", "--output", str(output),
            *[item for override in FAST for item in ("--set", override)], *extra]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An output with sparsify, both CLTs and both variants' graphs finished (tests copy it)."""
    root = tmp_path_factory.mktemp("finished")
    config = load_config(preset="tiny", overrides=FAST)
    run_pipeline(config, STAGES.split(","), str(root), executor="local", progress=False)
    return root


def copy_of(finished: Path, tmp_path: Path) -> Path:
    shutil.copytree(finished, tmp_path / "out")
    return tmp_path / "out"


# --------------------------------------------------------------------------------------------------
# Locks


def test_second_run_on_a_running_output_is_refused_naming_the_holder(tmp_path, capsys):
    output = tmp_path / "out"
    first = subprocess.Popen(RUN + fast_args(output, "--stages", "sparsify", "--set", "sparsify.train.steps=2000"),
                             env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = output / ".locks" / "sparsify.lock"
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert lock.exists(), "the first run never locked its stage"
        assert run_module.main(fast_args(output, "--stages", "sparsify")) == 1
        err = capsys.readouterr().err
        assert len(error_lines(err)) == 1, err
        line = error_lines(err)[0]
        assert f"output {output}/sparsify (stage sparsify) is in use by another run" in line
        assert f"pid {first.pid} on host {socket.gethostname()} since " in line
        assert first.poll() is None and not (output / "sparsify" / MANIFEST).exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def write_lock(path: Path, pid: int, host: str, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "started_at": time.time() - age_s, "token": "theirs"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_lock_of_a_dead_run_on_this_host_is_taken_over(finished, tmp_path):
    output = copy_of(finished, tmp_path)
    lock = output / ".locks" / "sparsify.lock"
    write_lock(lock, dead_pid(), socket.gethostname())
    assert run_module.main(fast_args(output, "--stages", "sparsify", "--force", "sparsify")) == 0
    assert not lock.exists()  # released at the end
    assert json.loads((output / "sparsify" / MANIFEST).read_text())["stage"] == "sparsify"


def test_lock_from_another_host_is_refused_while_fresh_and_taken_over_when_stale(tmp_path):
    locks = tmp_path / "locks"
    write_lock(locks / "clt_dense.lock", os.getpid(), "elsewhere", age_s=30)
    with pytest.raises(OutputLockedError, match=r"^clt/dense is in use by another run: pid \d+ on host elsewhere"):
        with OutputLocks(locks, ["clt_dense"], {"clt_dense": "clt/dense"}, stale_after_s=60):
            pass
    with OutputLocks(locks, ["clt_dense"], {"clt_dense": "clt/dense"}, stale_after_s=20) as held:
        assert json.loads((locks / "clt_dense.lock").read_text())["token"] == held.holder.token
    assert not (locks / "clt_dense.lock").exists()


def test_a_held_lock_is_refreshed_and_only_its_own_is_released(tmp_path):
    locks = tmp_path / "locks"
    with OutputLocks(locks, ["a", "b"], {"a": "a", "b": "b"}, stale_after_s=0.4) as held:
        os.utime(locks / "a.lock", (0, 0))
        deadline = time.monotonic() + 30
        while (locks / "a.lock").stat().st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (locks / "a.lock").stat().st_mtime > 0, "the heartbeat never refreshed the lock"
        write_lock(locks / "b.lock", os.getpid(), "elsewhere")  # taken over by another run meanwhile
        assert held.holder.pid == os.getpid()
    assert not (locks / "a.lock").exists()
    assert json.loads((locks / "b.lock").read_text())["token"] == "theirs"


def test_partial_acquisition_releases_what_it_took(tmp_path):
    locks = tmp_path / "locks"
    write_lock(locks / "b.lock", os.getpid(), socket.gethostname())  # a live holder: this process
    with pytest.raises(OutputLockedError, match="^b is in use"):
        with OutputLocks(locks, ["a", "b"], {"a": "a", "b": "b"}, stale_after_s=600):
            pass
    assert not (locks / "a.lock").exists() and (locks / "b.lock").exists()


# --------------------------------------------------------------------------------------------------
# One line per error


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_stage_exception_is_one_error_line(tmp_path, executor):
    args = ["--preset", "tiny", "--stages", "sparsify", "--quiet", "--executor", executor,
            "--set", "sparsify.data.source=/nonexistent/corpus", "--output", str(tmp_path / "out")]
    result = subprocess.run(RUN + args, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    lines = error_lines(result.stderr)
    expected = "error: stage sparsify failed: FileNotFoundError: data.source '/nonexistent/corpus' is not a file"
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_config_is_a_config_error(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"sparsify: \xff\xfe\n")
    assert run_module.main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: config file {config} is not UTF-8 text ('utf-8' codec can't decode byte 0xff in position 10: "
        "invalid start byte)"]


def test_fault_outside_the_stages_is_one_error_line(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("boom\n  second line")

    monkeypatch.setattr(run_module, "run_pipeline", broken)
    assert run_module.main(["--preset", "tiny", "--output", str(tmp_path / "out")]) == 1
    assert error_lines(capsys.readouterr().err) == ["error: TypeError: boom second line"]


# --------------------------------------------------------------------------------------------------
# Config types


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sparsify.train.steps=true", "sparsify.train.steps: expected a number, got a boolean"),
        ("clt.train.warmup_steps=false", "clt.train.warmup_steps: expected a number, got a boolean"),
        ("resources.stages.sparsify.num_cpus=0.5",
         "resources.stages.sparsify.num_cpus: Input should be a valid integer, got a number with a fractional part"),
        ("resources.default.num_cpus=1.5", "resources.default.num_cpus: Input should be a valid integer"),
        ("resources.default.num_cpus=true", "resources.default.num_cpus: expected a number, got a boolean"),
    ],
)
def test_config_refuses_booleans_as_numbers_and_fractional_threads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="tiny", overrides=[override])


def test_config_keeps_plain_numbers():
    config = load_config(preset="tiny", overrides=["sparsify.train.lr=1", "resources.default.num_cpus=2",
                                                   "sparsify.train.gate_noise=true"])
    assert config.sparsify.train.lr == 1.0 and config.resources.default.num_cpus == 2
    assert config.sparsify.train.gate_noise is True


def test_empty_stage_list_is_refused(tmp_path, capsys):
    assert run_module.main(["--preset", "tiny", "--stages", ",", "--output", str(tmp_path / "out")]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --stages ',' names no stage; stages are ['sparsify', 'clt', 'features', 'attribution', 'compare']"]
    with pytest.raises(ConfigError, match="no stage to run"):
        run_pipeline(load_config(preset="tiny"), [], str(tmp_path / "out"), executor="local")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Integrity of finished stages


def test_files_changed_after_the_manifest_are_refused_on_rerun(finished, tmp_path, capsys):
    output = copy_of(finished, tmp_path)
    weights = output / "sparsify" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, one bit
    weights.write_bytes(bytes(data))
    (output / "sparsify" / "model" / "gate.json").unlink()
    shutil.rmtree(output / "sparsify" / "checkpoints")  # resume state, not an output
    assert run_module.main(fast_args(output, "--stages", "sparsify")) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: stage sparsify: 2 of its files changed after it finished: sparsify/model/gate.json (missing), "
        "sparsify/model/model.safetensors (content changed); "
        "recompute it with --force sparsify (and sparsify in --stages)"]
    assert run_module.main(fast_args(output, "--stages", "clt")) == 2  # as an input of a later stage, too
    assert "stage sparsify: 2 of its files changed" in capsys.readouterr().err
    assert run_module.main(fast_args(output, "--stages", "sparsify", "--force", "sparsify")) == 0
    assert run_module.main(fast_args(output, "--stages", "sparsify")) == 0
    assert "[skipped (done before)]" in capsys.readouterr().out


def test_stages_sharing_a_directory_check_their_own_files(finished, tmp_path, capsys):
    output = copy_of(finished, tmp_path)
    manifests = {variant: json.loads((output / "graphs" / "_stages" / variant / MANIFEST).read_text())["files"]
                 for variant in ("dense", "sparse")}
    for variant, files in manifests.items():
        assert files and all(f"/variant={variant}/" in name or name == f"graphs/{variant}_attribution_config.yaml"
                             for name in files)
    victim = next(name for name in manifests["sparse"] if name.startswith("graphs/edges/"))
    with open(output / victim, "ab") as stream:
        stream.write(b"\0")
    assert run_module.main(fast_args(output, "--stages", "attribution")) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: stage attribution_sparse: 1 of its files changed after it finished: {victim} (size changed); "
        "recompute it with --force attribution (and attribution in --stages)"]


# --------------------------------------------------------------------------------------------------
# Content keys: graph ids from contents, a forced attribution replaces its variant's graphs


def test_forced_attribution_in_a_copied_output_gives_the_same_graph_ids(finished, tmp_path):
    output = copy_of(finished, tmp_path)  # every path differs, every file's content is the same
    before = open_store(finished / "graphs").list_graphs()
    assert run_module.main(fast_args(output, "--stages", "attribution", "--force", "attribution")) == 0
    after = open_store(output / "graphs").list_graphs()
    assert sorted(after["graph_id"]) == sorted(before["graph_id"]) and len(after) == 6


def test_forced_attribution_after_a_clt_change_replaces_the_old_graphs(finished, tmp_path):
    output = copy_of(finished, tmp_path)
    before = open_store(output / "graphs").list_graphs()
    changed = ["--set", "clt.train.steps=21", "--stages", "clt,attribution", "--force", "clt", "--force", "attribution"]
    assert run_module.main(fast_args(output, *changed)) == 0
    after = open_store(output / "graphs").list_graphs()
    assert not after.duplicated(["variant", "task", "prompt_index"]).any()
    assert len(after) == len(before) and not set(after["graph_id"]) & set(before["graph_id"])
    summary = {variant: json.loads((output / "graphs" / "_stages" / variant / MANIFEST).read_text())["summary"]
               for variant in ("dense", "sparse")}
    assert [summary[v]["removed"] for v in ("dense", "sparse")] == [3, 3]


# --------------------------------------------------------------------------------------------------
# A read-only finished output


def make_read_only(path: Path) -> None:
    """Read-only for this process: permission bits for a normal user; root ignores those, so for root the
    immutable attribute (chattr +i), which binds root too; skip where neither is possible."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(path)],
                                                        capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
        pytest.skip("running as root without chattr +i (immutable files): cannot make a directory read-only")


def make_writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)
    else:
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)


def test_rerun_on_a_read_only_finished_output_skips_everything(finished, tmp_path, capsys):
    output = copy_of(finished, tmp_path)
    make_read_only(output)
    try:
        with pytest.raises(OSError):  # the simulation is real: nothing can be written there
            (output / "probe").write_text("")
        assert run_module.main(fast_args(output, "--stages", STAGES)) == 0
        out = capsys.readouterr().out
        assert out.count("[skipped (done before)]") == 5, out
        assert run_module.main(fast_args(output, "--stages", "sparsify", "--force", "sparsify")) == 2
        assert error_lines(capsys.readouterr().err)[0].startswith(f"error: output {output} is not writable")
    finally:
        make_writable(output)
