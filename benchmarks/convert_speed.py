"""Convert time and peak memory: eca-surgery vs the naive path vs the I/O floor.

Two tables, from one run, every path in its own fresh process (peak RSS is per process),
paths interleaved, ``--repeats`` rounds (each round in an order turned by one, so that no
path always runs after the same one, which on a disk leaves it its freed blocks to discard);
min and median wall time, and each ratio as the median over rounds of that round's ratio (a
path against the naive path or the floor of the same round, a minute apart at most, so that
a slow stretch of the shared machine weighs on both sides of a ratio).

Work only (each process first pays the imports every path pays: torch, timm, safetensors,
eca_surgery; then times only the work):

* naive: timm.create_model (random init of every weight), load_state_dict from the
  file, replace the SE blocks, save;
* ours: eca_surgery's convert as the CLI runs it (meta-device build, weights assigned
  from the file, plan, apply, output-shape and finite-value checks, MACs, timm-native
  search) and Conversion.save, with what an earlier run learnt about the build in the cache
  folder (the original's meta-device pass, the timm-native candidates' shapes: one untimed
  convert fills it before the runs);
* ours, empty cache: the same, each run with a cache folder of its own, empty: the first
  convert of a model with these versions;
* ours (core): the same work as the naive path (no checks, MACs or timm-native search);
* floor: safetensors load_file + save_file of the same tensors, nothing else;
* floor, durable: the same and an fsync of the file written, as eca-surgery's writes end;
* load_patched / verify: of ours' output, against a meta-device build of the model plus
  safetensors' load_file of that output (what loading can hardly go below).

Whole process, imports included, as a user runs them:

* cli: ``eca-surgery convert MODEL -r se-to-eca -c FILE -o OUT`` (``python -m eca_surgery``);
* naive script: ``python -c`` with timm.create_model, load_state_dict, a loop that puts
  timm's EcaModule where each SE block was, and save_file;
* floor script: ``python -c`` importing torch and safetensors, load_file + save_file.

Every run starts after ``os.sync()``, with no dirty pages left by the run before it: eca-surgery
fsyncs what it writes (and so pays for its own write-back), the naive and floor paths do not
(the durable floor does). The children's cache folder is one in the benchmark's temp folder.
Every original tensor of every converted output is compared bitwise with the checkpoint's.
The tables are printed and written to ``benchmarks/results/convert_speed.md``. By default each
run replaces the output its path wrote the round before (as ``--force`` does; before the first
round each path's output that the untimed convert did not write is an untimed copy of the
checkpoint); ``--fresh``
removes it first (untimed, before the ``os.sync()``), so that each run writes a new file.

    python benchmarks/convert_speed.py                       # seresnext101_32x8d
    python benchmarks/convert_speed.py seresnextaa201d_32x8d --repeats 3
    python benchmarks/convert_speed.py --dir /dev/shm --out /tmp/shm.md   # in memory: no disk
    python benchmarks/convert_speed.py --fresh --out /tmp/fresh.md        # every output a new file
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, os, resource, sys, time
import torch, timm, safetensors.torch
from eca_surgery import apply_plan, convert, load_patched, load_recipe, make_plan, verify

path, name, ckpt, out, converted = sys.argv[1:6]
if path == "ours-cold":
    import os, tempfile
    os.environ["ECA_SURGERY_CACHE"] = tempfile.mkdtemp(dir=os.path.dirname(out))
recipe = load_recipe("se-to-eca")
t0 = time.perf_counter()
if path == "naive":
    model = timm.create_model(name)
    model.load_state_dict(safetensors.torch.load_file(ckpt), strict=True)
    apply_plan(model, make_plan(model, recipe, name))
    safetensors.torch.save_file(model.state_dict(), out)
elif path in ("ours", "ours-cold", "ours-core"):
    full = path != "ours-core"
    convert(name, recipe, checkpoint=ckpt, check=full, flops=full, timm_native=full, output=out, force=True)
elif path == "load_patched":
    load_patched(converted)
elif path == "verify":
    verify(converted)
elif path == "meta+read":
    with torch.device("meta"):
        timm.create_model(name)
    safetensors.torch.load_file(converted)
else:
    safetensors.torch.save_file(safetensors.torch.load_file(ckpt), out)
    if path == "floor-fsync":
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

NAIVE_SCRIPT = r"""
import sys, timm, safetensors.torch
from timm.layers import EcaModule
name, ckpt, out = sys.argv[1:4]
model = timm.create_model(name)
model.load_state_dict(safetensors.torch.load_file(ckpt))
for module in list(model.modules()):
    se = getattr(module, "se", None)
    if se is not None and hasattr(se, "fc1"):
        module.se = EcaModule(se.fc1.in_channels)
safetensors.torch.save_file(model.state_dict(), out)
"""

DRY_RUN_SCRIPT = r"""
import runpy, sys
sys.argv = ["eca-surgery", "convert", *sys.argv[1:], "-r", "se-to-eca", "--dry-run", "--json"]
try:
    runpy.run_module("eca_surgery", run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print("READ", io["rchar"], io["read_bytes"])
"""

SOURCE_SCRIPT = r"""
import sys, torch, timm, safetensors.torch
torch.manual_seed(0)
safetensors.torch.save_file(timm.create_model(sys.argv[1]).state_dict(), sys.argv[2])
"""

FLOOR_SCRIPT = r"""
import sys, safetensors.torch
name, ckpt, out = sys.argv[1:4]
safetensors.torch.save_file(safetensors.torch.load_file(ckpt), out)
"""

WORK = (
    "naive",
    "ours",
    "ours-cold",
    "ours-core",
    "floor",
    "floor-fsync",
    "load_patched",
    "verify",
    "meta+read",
)
WHOLE = ("cli", "naive script", "floor script")
WRITERS = tuple(p for p in WORK + WHOLE if p not in ("load_patched", "verify", "meta+read"))  # write a file
LABELS = {
    "naive": "naive: random init, load, replace, save",
    "ours": "eca-surgery, as the CLI runs it (checks, MACs, timm-native search)",
    "ours-cold": "the same, empty cache folder (first convert of this build)",
    "ours-core": "eca-surgery, the same work as naive (`check=False, flops=False, timm_native=False`)",
    "floor": "I/O floor: safetensors load + save",
    "floor-fsync": "I/O floor, durable: load + save + fsync",
    "load_patched": "`load_patched` of the converted file",
    "verify": "`verify` of the converted file (load + finite check)",
    "meta+read": "meta-device build + safetensors `load_file` of it",
    "cli": "`eca-surgery convert MODEL -r se-to-eca -c FILE -o OUT`",
    "naive script": "naive script (`python -c`: create_model, load, EcaModule loop, save_file)",
    "floor script": "floor script (`python -c`: load_file + save_file)",
}


def timed(argv: list[str], log: Path) -> dict:
    """Run ``argv`` to the end; its wall time and peak RSS (from the kernel's record of that
    child), and its stdout's last line. Every run starts with no dirty pages left by the one
    before (``os.sync``): each path writes 358 MiB, and a path that does not flush its file
    (the naive and floor paths) would leave the next one to wait for that write-back."""
    os.sync()
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{argv[:4]} failed:\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "last": log.read_text().strip()}


def output(tmp: Path, path: str) -> Path:
    """The file ``path`` writes in ``tmp``."""
    return tmp / f"{path.replace(' ', '-')}.safetensors"


def run(path: str, name: str, ckpt: Path, tmp: Path) -> dict:
    """One run of ``path``; its seconds (work only for WORK, whole process for WHOLE) and peak RSS."""
    import json

    out, log = output(tmp, path), tmp / "log.txt"
    if path in WORK:
        argv = [sys.executable, "-c", WORKER, path, name, str(ckpt), str(out), str(tmp / "ours.safetensors")]
        return json.loads(timed(argv, log)["last"].splitlines()[-1])  # the worker's own peak RSS
    if path == "cli":
        argv = [sys.executable, "-m", "eca_surgery", "convert", name, "-r", "se-to-eca", "-c", str(ckpt)]
        argv += ["-o", str(out), "--force"]
    else:
        argv = [sys.executable, "-c", NAIVE_SCRIPT if path == "naive script" else FLOOR_SCRIPT]
        argv += [name, str(ckpt), str(out)]
    return timed(argv, log)


def dry_run_bytes(name: str, ckpt: Path, tmp: Path) -> int | None:
    """Bytes a CLI dry run reads (``rchar``: every read() call) with ``--checkpoint`` beyond one
    without it: what it reads of the checkpoint (None where /proc/self/io is missing)."""
    if not Path("/proc/self/io").exists():
        return None
    counts = []
    for extra in ([], ["-c", str(ckpt)]):
        found = timed([sys.executable, "-c", DRY_RUN_SCRIPT, name, *extra], tmp / "log.txt")["last"]
        counts.append(int(found.splitlines()[-1].split()[1]))
    return counts[1] - counts[0]


def identical(tmp: Path, ckpt: Path) -> tuple[bool, int]:
    """Whether every original tensor of every converted output equals the checkpoint's, bitwise."""
    import safetensors.torch
    import torch

    original = safetensors.torch.load_file(ckpt)
    outputs = [
        safetensors.torch.load_file(output(tmp, p))
        for p in ("naive", "ours", "ours-cold", "cli", "naive script")
    ]
    kept = [k for k in original if k in outputs[0]]
    same = all(torch.equal(original[k], out[k]) for out in outputs for k in kept)
    return same and all(out.keys() == outputs[0].keys() for out in outputs), len(kept)


def ratios(results: dict, path: str, base: str) -> list[float]:
    """``path``'s time over ``base``'s, round by round."""
    return [r["seconds"] / b["seconds"] for r, b in zip(results[path], results[base], strict=True)]


def table(paths: tuple[str, ...], results: dict, base: str, floor: str) -> list[str]:
    lines = [
        f"| path | min s | median s | vs {base} | vs {floor} | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in paths:
        secs = [r["seconds"] for r in results[p]]
        rss = max(r["peak_rss_mb"] for r in results[p])
        lines.append(
            f"| {LABELS[p]} | {min(secs):.2f} | {statistics.median(secs):.2f} | "
            f"{statistics.median(ratios(results, p, base)):.2f} | "
            f"{statistics.median(ratios(results, p, floor)):.2f} | {rss:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default="seresnext101_32x8d")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "convert_speed.md")
    parser.add_argument(
        "--dir", type=Path, default=None, help="Folder for the files (default: the system's temp folder)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="remove each path's output before its run (untimed), so that every run writes a new file "
        "rather than replacing the one its path wrote the round before",
    )
    args = parser.parse_args()

    # this process imports torch only after the runs: a child forked from a process holding a
    # model would start with that memory counted in its peak RSS
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "source.safetensors"
        timed([sys.executable, "-c", SOURCE_SCRIPT, args.model, str(ckpt)], tmp / "log.txt")
        size_mb = ckpt.stat().st_size / 2**20
        os.environ["ECA_SURGERY_CACHE"] = str(tmp / "cache")  # the children's, not the user's
        run("ours", args.model, ckpt, tmp)  # fills it, untimed: see "ours"
        if not args.fresh:  # the first round replaces a file too, as every later one does
            for path in WRITERS:
                if not output(tmp, path).exists():  # ours' is there: the untimed run wrote it
                    shutil.copyfile(ckpt, output(tmp, path))
        results: dict[str, list[dict]] = {p: [] for p in WORK + WHOLE}
        paths = WORK + WHOLE
        for repeat in range(args.repeats):  # each round starts one path later: no path always follows another
            for path in paths[repeat:] + paths[:repeat]:
                if args.fresh and path in WRITERS:
                    output(tmp, path).unlink(missing_ok=True)
                results[path].append(run(path, args.model, ckpt, tmp))
        same, compared = identical(tmp, ckpt)
        dry_read = dry_run_bytes(args.model, ckpt, tmp)

    import timm
    import torch

    lines = [
        f"{args.model}: checkpoint {size_mb:.0f} MiB, {args.repeats} interleaved runs per path, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}, "
        f"files in {args.dir or tempfile.gettempdir()}"
        + (", each output removed before its run (--fresh)" if args.fresh else ", each output replaced"),
        "",
        "Work only (imports excluded):",
        "",
        *table(WORK, results, "naive", "floor"),
        "",
        "Round by round, eca-surgery as the CLI runs it against the floor: "
        + " ".join(f"{x:.2f}" for x in ratios(results, "ours", "floor"))
        + "; against the durable floor: "
        + " ".join(f"{x:.2f}" for x in ratios(results, "ours", "floor-fsync"))
        + ".",
        "",
        "Whole process (imports included):",
        "",
        *table(WHOLE, results, "naive script", "floor script"),
        "",
        f"Original tensors bit-identical to the checkpoint in every converted output (naive, ours, "
        f"ours with an empty cache, cli, naive script), same keys: {same} ({compared} original tensors compared).",
        "",
        f"`eca-surgery convert {args.model} -r se-to-eca --dry-run -c FILE` read {dry_read} bytes more "
        f"than the same dry run without `-c` (rchar of /proc/self/io): the header of the {size_mb:.0f} MiB file.",
    ]
    print("\n".join(lines))
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
