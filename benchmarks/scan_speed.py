"""Time `eca-surgery scan` against the floor: a bare meta-device build of the same models.

In one run, each as a whole process (imports included), with an empty cache of its own:
  (a) `eca-surgery scan PATTERN --json` with the default jobs (the cores available);
  (b) one process that builds the same models (the pattern's list) on the meta device
      with timm and counts their parameters, nothing else;
  (c) the same scan again, from the cache, and whether its output equals (a)'s.
Prints the ratio a / b (target: <= 1.2 over the whole zoo on 2 cores) and c (target: < 2 s).

    python benchmarks/scan_speed.py                       # the whole timm zoo (5-15 min)
    python benchmarks/scan_speed.py --pattern 'seres*'    # a quick look
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import sys, time
t0 = time.perf_counter()
import timm, torch
names = timm.list_models(sys.argv[1])
t1 = time.perf_counter()
for name in names:
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        sum(p.numel() for p in model.parameters())
    except Exception:
        pass
print(f"{len(names)} {t1 - t0:.3f} {time.perf_counter() - t1:.3f}")
"""


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of ``cmd`` as a whole process, and its stdout."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pattern", default="*", help="timm model-name pattern (default: the whole zoo)")
    parser.add_argument("--jobs", type=int, default=None, help="scan --jobs (default: the scan's own)")
    args = parser.parse_args()
    scan = [sys.executable, "-m", "eca_surgery", "scan", args.pattern, "--json"]
    scan += ["--jobs", str(args.jobs)] if args.jobs else []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ECA_SURGERY_CACHE": cache}
        scan_s, first = timed(scan, env)
        bare_s, bare_out = timed([sys.executable, "-c", BARE, args.pattern], env)
        cached_s, again = timed(scan, env)
    count, bare_import, bare_build = bare_out.split()
    print(
        f"machine: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores"
    )
    print(f"pattern {args.pattern!r}: {count} models")
    print(f"(a) eca-surgery scan, whole process:          {scan_s:8.1f} s")
    print(
        f"(b) bare meta build + param count, whole process: {bare_s:8.1f} s "
        f"(imports+list {float(bare_import):.1f} s, builds {float(bare_build):.1f} s)"
    )
    print(f"ratio a / b:                                  {scan_s / bare_s:8.2f}x (target <= 1.2x)")
    print(f"(c) cached re-scan, whole process:            {cached_s:8.2f} s (target < 2 s)")
    print(f"cached output identical to the first scan's:  {first == again}")
    if Path("/proc/loadavg").exists():
        print(f"load average after the run: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
