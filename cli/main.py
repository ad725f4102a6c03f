"""`sparse-interp`: the project's command line, one subcommand per task.

    sparse-interp run --preset tiny --output runs/tiny        the pipeline (as pipeline/run.py)
    sparse-interp attribute -p "..." --model smollm2-135m --clt DIR --store graphs/
    sparse-interp query graphs graphs/                         tables from a store
    sparse-interp export graphs/ GRAPH_ID --out frontend/      circuit-tracer frontend JSON
    sparse-interp serve graphs/                                the graph viewer

Exit status: 0 done, 1 a runtime error (a model, store or prompt that fails), 2 a usage or config
error (a bad option value, a missing file); each error is one line on stderr naming the bad value
(--traceback adds the traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from attribution.store import GraphNotFoundError
from cli import attribute, query
from cli.errors import UsageError, describe_error, one_line
from pipeline import run as pipeline_run
from pipeline.config import ConfigError
from prompts.tasks import TaskError
from sparse_attention.models import ModelLoadError

PROG = "sparse-interp"
USAGE_ERRORS = (UsageError, ConfigError, TaskError, ModelLoadError, GraphNotFoundError, ValidationError)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `sparse-interp attribute: error: argument --max-n-logits: ...`."""

    def error(self, message: str) -> None:  # noqa: D102 - argparse's hook
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(commands)
    _add_attribute(commands)
    _add_query(commands)
    _add_export(commands)
    _add_serve(commands)
    return parser


def _subcommand(commands, name: str, summary: str, description: str | None = None) -> Parser:
    return commands.add_parser(name, help=summary, description=description or summary,
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_run(commands) -> None:
    parser = _subcommand(commands, "run", "run the pipeline (the same options as pipeline/run.py)",
                         pipeline_run.__doc__)
    pipeline_run.add_arguments(parser)
    parser.set_defaults(handler=pipeline_run.execute, handles_errors=True)


def _add_attribute(commands) -> None:
    parser = _subcommand(commands, "attribute", "attribution graphs of prompts, into a store", attribute.__doc__)
    attribute.add_arguments(parser)
    parser.set_defaults(handler=attribute.execute)


def _add_query(commands) -> None:
    parser = _subcommand(commands, "query", "print a table from a store", query.__doc__)
    query.add_query_arguments(parser)


def _add_export(commands) -> None:
    parser = _subcommand(commands, "export", "write stored graphs as circuit-tracer frontend JSON")
    query.add_export_arguments(parser)
    parser.set_defaults(handler=query.export)


def _add_serve(commands) -> None:
    parser = _subcommand(commands, "serve", "serve the graph viewer of a store on a local web page")
    parser.add_argument("store", type=Path, help="store directory (written by `attribute` or the pipeline)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default %(default)s)")
    add_traceback_option(parser)
    parser.set_defaults(handler=serve)


def add_traceback_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traceback", action="store_true", help="print the traceback of an error, too")


def serve(args: argparse.Namespace) -> int:
    """Serve the viewer (the `viewer` package, imported only here) on the store until interrupted."""
    if not args.store.is_dir():
        raise UsageError(f"store {args.store} is not a directory")
    try:
        import viewer
    except ModuleNotFoundError as error:
        if error.name != "viewer":
            raise
        raise RuntimeError("the graph viewer is not installed (no package `viewer`); install "
                           "sparse-attention-interp with its viewer to use `serve`") from None
    viewer.serve(args.store, args.host, args.port)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    if getattr(args, "handles_errors", False):  # `run`: pipeline/run.py reports its own errors
        return handler(args)
    try:
        return handler(args)
    except USAGE_ERRORS as error:
        return report(error, 2, args.traceback)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a runtime fault: still one line
        return report(error, 1, args.traceback)


def report(error: Exception, status: int, with_traceback: bool) -> int:
    if with_traceback:
        traceback.print_exception(error)
    message = str(error) if isinstance(error, UsageError) else describe_error(error)
    print(f"error: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
