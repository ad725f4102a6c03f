"""Run the pipeline: `python pipeline/run.py --preset tiny --stages sparsify --output DIR`.

Stages run as Ray tasks: embedded Ray by default, a cluster when RAY_ADDRESS is set (as under
`ray job submit --working-dir . -- python pipeline/run.py ...`), or in-process with --executor local.
A stage whose output exists for the same config (and whose files match its manifest) is skipped;
--force STAGE recomputes it. A second run on an output that a running stage holds is refused.
Exit status: 0 done, 1 a stage failed or its output is locked by another run, 2 a config or output error,
130 interrupted; each error is one line on stderr (`error: ...`; --traceback adds the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.artifacts import ArtifactError
from pipeline.config import ConfigError, load_config
from pipeline.locks import OutputLockedError
from pipeline.orchestrate import StageError, describe_error, run_pipeline
from pipeline.stages import GROUPS, STAGES

log = logging.getLogger("pipeline")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pipeline's options (shared with `sparse-interp run`)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config file")
    source.add_argument("--preset", help="named preset in pipeline/presets/")
    parser.add_argument("--stages", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    parser.add_argument("--output", required=True, help="output directory or pyarrow filesystem URI")
    parser.add_argument("--force", action="append", default=[], help="recompute this stage even if done")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set sparsify.train.steps=50")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="ray (embedded or RAY_ADDRESS) or local (in-process, no Ray)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--traceback", action="store_true", help="print the traceback of an error, too")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return execute(parse_args(argv))


def execute(args: argparse.Namespace) -> int:
    """Run the pipeline as `args` (from `add_arguments`) say; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    try:
        config = load_config(args.config, args.preset, args.overrides)
        groups = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in groups + args.force if s not in GROUPS]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(GROUPS)}")
        if not groups:
            raise ConfigError(f"--stages {args.stages!r} names no stage; stages are {list(GROUPS)}")
        results = run_pipeline(config, groups, args.output, force=args.force, executor=args.executor,
                               progress=not args.quiet)
    except (ConfigError, ArtifactError) as error:
        return _report(error, str(error), 2, args.traceback)
    except (StageError, OutputLockedError) as error:
        return _report(error, str(error), 1, args.traceback)
    except Exception as error:  # a fault outside any stage: still one line
        return _report(error, describe_error(error), 1, args.traceback)
    except KeyboardInterrupt:
        print("interrupted: finished stages are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"\npipeline finished in {time.perf_counter() - started:.1f} s; outputs:")
    root = args.output.rstrip("/")
    for name, result in results.items():
        stage = STAGES[name]
        state = "skipped (done before)" if result.get("skipped") else f"{result['seconds']:.1f} s"
        print(f"  {name:<20} {root}/{stage.directory}  [{state}]")
        print(f"  {'':<20}   {stage.outputs}; manifest {root}/{stage.manifest_dir}/manifest.json")
        counts = result.get("summary", {})
        if "failures_in_store" in counts and not result.get("skipped"):
            print(f"  {'':<20}   {counts['graphs']} graphs computed, {counts['skipped']} already stored, "
                  f"{counts['failures_in_store']} failed prompts recorded")
    return 0


def _report(error: Exception, message: str, status: int, with_traceback: bool) -> int:
    if with_traceback:
        traceback.print_exception(error)
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
