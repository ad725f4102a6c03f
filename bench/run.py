"""Run every benchmark script in bench/ (each writes its JSON into bench/results/) and list the results.

Usage: python bench/run.py [name ...]   (names without .py; default: all bench/*.py except this file)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != "run.py" and not p.name.startswith("_"))
    if names:
        scripts = [p for p in scripts if p.stem in names]
    failed = []
    for script in scripts:
        print(f"== {script.stem}", flush=True)
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(script)], cwd=BENCH.parent)
        print(f"== {script.stem}: exit {result.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
        if result.returncode:
            failed.append(script.stem)
    print("results:", *sorted(str(p.relative_to(BENCH.parent)) for p in (BENCH / "results").glob("*.json")), sep="\n  ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
