"""Speed and memory of every trainer against MoCo v2, on the device this runs on (docs/benchmarks.md).

    python -m tools.benchmark                        # the papers' shape: ResNet-50, 224 px (InsLoc 256), batch 64
    python -m tools.benchmark --tiny                 # the trainers' --tiny sizes (ResNet-18, 64 px, batch 32): CPU
    python -m tools.benchmark --batch-size 128 --steps 60 --output-dir runs/benchmark_b128

Each row trains its trainer on the toy world for --steps steps in a process of its own (so its peak memory is its
own), logging every step, with the device's defaults (CUDA: bf16 autocast and channels_last; CPU: fp32, NCHW).
After a warm-up of steps // 5 steps (at least 1) it reports the medians of the step time (the step and its wait
for data), img/s and the data time (that wait); the peak memory (CUDA: max allocated; CPU: max RSS of the
process); and the loader's CPU time per item (`--bench-loader`: one thread, decode + geometry). Each is also a
ratio to the first row, MoCo v2 (`dilo.py --paste-prob 0`), measured by the same command. The table is printed
and written, with every step's log row, to <output-dir>/benchmark.json.
"""
import argparse
import contextlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import torch

import detco
import dilo
import dupr
import insloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = {"dilo": dilo, "dupr": dupr, "detco": detco, "insloc": insloc}
ROWS = [  # (label, trainer, its own flags); MoCo v2 first: the other rows are ratios to it
    ("MoCo v2", "dilo", ["--paste-prob", "0"]),
    ("DiLo", "dilo", []),
    ("DUPR", "dupr", []),
    ("DetCo", "detco", []),
    ("InsLoc C4", "insloc", ["--variant", "c4"]),
    ("InsLoc FPN", "insloc", ["--variant", "fpn"]),
]
COLUMNS = [  # (key, header, format of the value)
    ("step_time_s", "s/step", "{:.3f}"), ("img_per_s", "img/s", "{:,.1f}"), ("data_time_ms", "data time", "{:.1f} ms"),
    ("memory_mb", "peak memory", "{:,.0f} MB"), ("loader_ms", "loader CPU", "{:.2f} ms/item")]


def get_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the trainers' --tiny recipe (sizes, queues, workers)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: 64; --tiny: 32)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per row (default: 40; --tiny: 10)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="every row's image size, pixels (default: the trainers': 224, InsLoc 256; --tiny 64)")
    parser.add_argument("--arch", default=None, help="torchvision ResNet (default: resnet50; --tiny: resnet18)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers per row (default: the trainers': 8; --tiny 2)")
    parser.add_argument("--loader-items", type=int, default=None,
                        help="items timed by --bench-loader (default: one batch)")
    parser.add_argument("--output-dir", default="runs/benchmark",
                        help="one folder per row, and benchmark.json (default: runs/benchmark)")
    args = parser.parse_args(argv)
    args.steps = args.steps or (10 if args.tiny else 40)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: must be >= 2 (a warm-up step and a measured one)")
    if min(args.batch_size or 1, args.loader_items or 1) < 1 or (args.workers or 0) < 0:
        parser.error("--batch-size and --loader-items must be >= 1, --workers >= 0")
    return args


def trainer_flags(args, extra, output_dir):
    """The command line of one row: the shared flags, then the row's own."""
    flags = ["--data", "synthetic", "--epochs", "1", "--steps", str(args.steps), "--print-freq", "1",
             "--resume", "none", "--output-dir", output_dir] + (["--tiny"] if args.tiny else [])
    batch_size = args.batch_size or (None if args.tiny else 64)
    for flag, value in (("--batch-size", batch_size), ("--image-size", args.image_size), ("--arch", args.arch),
                        ("--workers", args.workers)):
        flags += [flag, str(value)] if value is not None else []
    return flags + extra


def loader_ms(module, flags, items):
    """CPU ms per loader item from the trainer's --bench-loader, in this process (it sets one thread: restored)."""
    threads, printed = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            module.main(module.get_args(flags + ["--bench-loader", str(items)]))
    finally:
        torch.set_num_threads(threads)
    return float(re.search(r"loader ([0-9.]+) ms/item", printed.getvalue()).group(1))


def measure(label, name, extra, args):
    """One row: train in a child process, read its log.jsonl, then time its loader here."""
    folder = os.path.abspath(os.path.join(args.output_dir, label.lower().replace(" ", "_")))
    flags = trainer_flags(args, extra, folder)
    row = {"label": label, "command": f"{name}.py " + " ".join(extra), "flags": flags}
    result = subprocess.run([sys.executable, os.path.join(ROOT, f"{name}.py")] + flags, cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines() or [f"exit status {result.returncode}"]
        return {**row, "error": lines[-1]}
    with open(os.path.join(folder, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps = [r for r in log if "iteration" in r]
    warmup = max(1, len(steps) // 5)
    measured = steps[warmup:] or steps[-1:]  # an epoch shorter than --steps still gives a row
    median = lambda key: statistics.median(r[key] for r in measured)
    start = next(r for r in log if r.get("event") == "start")
    return {**row, "args": start["args"], "steps": steps, "warmup": warmup, "step_time_s": median("step_time"),
            "img_per_s": median("img_per_s"), "data_time_ms": 1000 * median("data_time"),
            "memory_mb": max(r["memory_mb"] for r in steps), "loader_ms": loader_ms(TRAINERS[name], flags,
                                                                    args.loader_items or start["args"]["batch_size"])}


def device_name():
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)} (uses cuda:0)"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"CPU: {model}, {os.cpu_count()} cores, {platform.machine()}, no GPU"


def settings(rows):
    """One line: what every row shared (from the first row that ran: its log's arguments)."""
    done = [row for row in rows if "error" not in row]
    if not done:
        return "no row ran"
    first = done[0]["args"]
    sizes = " / ".join(str(size) for size in sorted({row["args"]["image_size"] for row in done}))
    return (f"{'bf16 autocast' if first['amp'] else 'fp32'}, {'NHWC' if first['channels_last'] else 'NCHW'}; "
            f"{first['arch']}, batch {first['batch_size']}, image size {sizes} px, K {first['queue_size']}, "
            f"--bn-batch {first['bn_batch']}, --workers {first['workers']}; medians of steps "
            f"{done[0]['warmup'] + 1}-{len(done[0]['steps'])}")


def table(rows):
    """Markdown: one line per row, every value with its ratio to the first row (MoCo v2)."""
    base = rows[0]
    lines = ["| row | command | " + " | ".join(header for _, header, _ in COLUMNS) + " |",
             "|---" * (2 + len(COLUMNS)) + "|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | `{row['command'].strip()}` | failed: {row['error']} |")
            continue
        cells = []
        for key, _, form in COLUMNS:
            ratio = row[key] / base[key] if "error" not in base and base[key] > 0 else None
            cells.append(form.format(row[key]) + (f" ({ratio:.2f}x)" if ratio is not None else ""))
        lines.append(f"| {row['label']} | `{row['command'].strip()}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    start, rows = time.time(), []
    for label, name, extra in ROWS:
        print(f"{label}: {name}.py {' '.join(trainer_flags(args, extra, '...'))}", flush=True)
        rows.append(measure(label, name, extra, args))
    report = {"device": device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "command": "python -m tools.benchmark " + " ".join(sys.argv[1:]), "seconds": round(time.time() - start),
              "settings": settings(rows), "rows": rows, "table": table(rows)}
    with open(os.path.join(args.output_dir, "benchmark.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['device']}, torch {report['torch']}; {report['settings']}")
    print(report["table"])
    print(f"({report['seconds']} s; {os.path.join(args.output_dir, 'benchmark.json')})", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(1 if any("error" in row for row in main(get_args())["rows"]) else 0)
