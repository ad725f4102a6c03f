"""Run the pipeline: `python pipeline/run.py --preset tiny --stages sparsify --output DIR`.

For now each stage is called directly in this process; a stage whose metrics already exist is
skipped unless named in --force.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import STAGES, ConfigError, load_config

log = logging.getLogger("pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML config file")
    source.add_argument("--preset", help="named preset in pipeline/presets/")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--force", action="append", default=[], help="recompute this stage even if done")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set sparsify.train.steps=50")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.preset, args.overrides)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in stages + args.force if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
        output = Path(args.output)
        try:
            output.mkdir(parents=True, exist_ok=True)
            probe = output / ".write_probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"output {output} is not writable: {exc}") from None
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    summary = {}
    if "sparsify" in stages:
        from sparse_attention import stage as sparsify

        stage_dir = output / "sparsify"
        if (stage_dir / sparsify.METRICS_FILE).exists() and "sparsify" not in args.force:
            log.info("sparsify: done already, skipping (%s)", stage_dir)
        else:
            log.info("sparsify: start")
            started = time.perf_counter()
            metrics = sparsify.run(config.sparsify, stage_dir, progress=not args.quiet)
            log.info("sparsify: end in %.1f s: dense CE %.4f, sparse CE %.4f, control CE %.4f, open edges %.2f%%",
                     time.perf_counter() - started, metrics["dense_ce"], metrics["sparse_ce"],
                     metrics["control_ce"], 100 * metrics["edge_fraction"])
        summary["sparsify"] = stage_dir
    for name, where in summary.items():
        print(f"{name}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
