"""The wheel: built with `pip wheel --no-deps`, installed into a fresh venv, used from another directory.
Its presets and prompt files are package data (found through importlib.resources), so the installed copy
runs without the source tree."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", "build", "dist", ".*_cache",
                               "node_modules")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ of a fresh venv holding the wheel alone, its dependencies seen from this interpreter's
    site-packages (a plain path line: this venv's editable install of the source tree stays out)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=SKIP)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", root / "dist", source], check=True, env=environment())
    (wheel,) = (root / "dist").glob("*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    (target,) = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                               capture_output=True, text=True).stdout.split()
    Path(target, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                    "--quiet", wheel], check=True, env=environment())
    return venv / "bin"


def environment() -> dict[str, str]:
    """This environment without PYTHONPATH (which would put the source tree back on the path)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return env | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def run_in(directory: Path, *argv, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], cwd=directory, env=environment(), capture_output=True,
                          text=True, timeout=timeout)


def test_the_installed_wheel_has_its_command_presets_and_prompt_files(installed, tmp_path):
    help_text = run_in(tmp_path, installed / "sparse-interp", "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert all(command in help_text.stdout for command in ("run", "attribute", "query", "export", "serve"))
    check = ("import pipeline.config as c, prompts.tasks as t\n"
             "print(c.PRESET_DIR); print(t.PROMPT_DIR); print(','.join(c.available_presets()))\n"
             "print(len(t.load_task('ioi')), len(t.load_task('antonyms')))")
    found = run_in(tmp_path, installed / "python", "-c", check)
    assert found.returncode == 0, found.stderr
    preset_dir, prompt_dir, presets, counts = found.stdout.splitlines()
    site_packages = installed.parent / "lib"
    assert Path(preset_dir).is_relative_to(site_packages) and Path(prompt_dir).is_relative_to(site_packages)
    assert presets == "demo,gemma3,tiny" and counts == "300 300"


@pytest.mark.slow
def test_the_installed_wheel_runs_the_tiny_preset(installed, tmp_path):
    result = run_in(tmp_path, installed / "sparse-interp", "run", "--preset", "tiny", "--quiet", "--output", "out",
                    timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pipeline finished" in result.stdout
    graphs = run_in(tmp_path, installed / "sparse-interp", "query", "graphs", "out/graphs", "--format", "csv")
    assert graphs.returncode == 0, graphs.stderr
    tasks = [line.split(",")[2] for line in graphs.stdout.splitlines()[1:]]
    assert sorted(set(tasks)) == ["antonyms", "custom", "greater_than"]  # prompt sets read from package data
