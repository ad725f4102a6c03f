"""`python -m viewer STORE [--host H] [--port P]`: serve the viewer of a graph store."""

from __future__ import annotations

import argparse
from pathlib import Path

from viewer.server import serve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m viewer", description="Serve a local web viewer of an "
                                     "attribution graph store (graphs, head loadings, QK pairs, feature dashboards).")
    parser.add_argument("store", type=Path, help="the store directory (the attribution stage's output, e.g. "
                        "runs/tiny/graphs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        serve(args.store, args.host, args.port)
    except (FileNotFoundError, OSError) as err:
        raise SystemExit(f"viewer: {err}") from None


if __name__ == "__main__":
    main()
