"""What the SmolLM2 stage benchmarks share: their command line, and running pipeline stages in a child process
(or recording a finished run instead)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stage_run_parser(description: str, default_output: Path, record_help: str) -> argparse.ArgumentParser:
    """--preset / --set / --output to run the stages, or --record a finished output; --tag names the result."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for pipeline/run.py")
    parser.add_argument("--output", type=Path, default=default_output)
    parser.add_argument("--record", type=Path, default=None, help=record_help)
    parser.add_argument("--tag", default="demo")
    return parser


def run_or_record(args: argparse.Namespace, stages: str, record_command: str) -> tuple[Path, dict]:
    """(output directory, how it was measured): `args.record` as recorded (by `record_command`, named in the
    result), or `args.output` after running `stages` there (`run_pipeline_stages`)."""
    if args.record is not None:
        return args.record, {"how": f"recorded from {args.record} ({record_command})"}
    return args.output, run_pipeline_stages(args, stages)


def run_pipeline_stages(args: argparse.Namespace, stages: str) -> dict:
    """Run pipeline/run.py for `stages` into args.output in a child process: how it was run, its wall time and
    the load average before it started."""
    command = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--preset", args.preset, "--stages", stages,
               "--output", str(args.output)] + [a for s in args.set for a in ("--set", s)]
    load_before = os.getloadavg()
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    return {"how": " ".join(["python"] + command[1:]), "command_wall_seconds": time.perf_counter() - started,
            "load_average_at_start": load_before}
