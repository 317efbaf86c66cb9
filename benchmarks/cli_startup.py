"""CLI start-up: `eca-surgery --help` vs `python -c "import torch"`, measured side by side.

The two commands run interleaved, ``--repeats`` times each, as fresh processes; the
table shows min and median wall time and the ratio of medians.

    python benchmarks/cli_startup.py --repeats 20
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    script = shutil.which("eca-surgery") or str(Path(sys.executable).parent / "eca-surgery")
    commands = {
        "eca-surgery --help": [script, "--help"],
        "eca-surgery recipes": [script, "recipes"],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for label, cmd in commands.items():
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[label].append(time.perf_counter() - t)
    base = statistics.median(times['python -c "import torch"'])
    print(f"{args.repeats} interleaved runs each")
    print(f"{'command':<28} {'min s':>7} {'median s':>9} {'vs import torch':>16}")
    for label, ts in times.items():
        print(
            f"{label:<28} {min(ts):>7.3f} {statistics.median(ts):>9.3f} {statistics.median(ts) / base:>16.2f}"
        )


if __name__ == "__main__":
    main()
