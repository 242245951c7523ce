"""Regenerate docs/RESULTS.md: run the benchmarks, then fill the template with their tables.

    python benchmarks/results.py            # runs sweep_engine.py and bench_decode.py, then assembles
    python benchmarks/results.py --assemble  # only assembles from docs/results/*.md

The narrative lives in benchmarks/RESULTS.template.md; every table comes from a file that
a benchmark command wrote, and each table states the command, machine and date.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"


def run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--out", str(RESULTS), *args], check=True)


def assemble() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from quicksilver.results_io import write_atomic

    template = (ROOT / "benchmarks" / "RESULTS.template.md").read_text()
    fills = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} CPU, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores; "
        f"Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}",
    }
    for part in sorted(RESULTS.glob("*.md")):
        fills[part.stem] = part.read_text().strip()
    text = template
    for key, value in fills.items():
        text = text.replace("{{" + key + "}}", value)
    missing = [line for line in text.splitlines() if "{{" in line]
    if missing:
        text = "\n".join(("_(not generated yet: run `make results`)_" if "{{" in line else line) for line in text.splitlines())
    write_atomic(ROOT / "docs" / "RESULTS.md", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--assemble", action="store_true", help="only rebuild RESULTS.md from existing tables")
    args = ap.parse_args()
    if not args.assemble:
        run("sweep_engine.py")
        run("layer_skip_map.py")
        run("bench_decode.py")
    assemble()


if __name__ == "__main__":
    main()
