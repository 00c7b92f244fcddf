"""Fleet simulator scale: wall time, CPU time, threads and memory vs fleet size (DESIGN 9).

Runs ``uptane sim --vehicles N --secondaries 4 --update-to 2 --json`` for each
N (default 10, 50, 200; add 500 with ``--sizes 10,50,200,500``) as a
subprocess and prints, per size: wall time, CPU-seconds (user + system of the
coordinator and its worker processes), ECU updates (ECUs x versions rolled
out), CPU-seconds and wall-seconds per ECU update, peak threads (the largest
thread count of any one process of the run, and the sum over its processes)
and peak RSS (sum over its processes), sampled from /proc every 0.2 s.

``ratio=`` is CPU-seconds per ECU update at the largest size / at the smallest
(goal <= 1.5: the cost per ECU stays flat as the fleet grows).

Run: ``.venv/bin/python bench/fleet_sim.py [--sizes 10,50,200] [--workers N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

UPTANE = str(Path(sys.executable).with_name("uptane"))


@dataclass
class Sample:
    threads_max: int = 0
    threads_sum: int = 0
    rss_sum_kib: int = 0


def _family(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status(pid: int) -> tuple[int, int]:
    threads = rss = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Threads:"):
                    threads = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return threads, rss


def _watch(pid: int, peak: Sample, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        stats = [_status(p) for p in _family(pid)]
        peak.threads_max = max(peak.threads_max, max((t for t, _ in stats), default=0))
        peak.threads_sum = max(peak.threads_sum, sum(t for t, _ in stats))
        peak.rss_sum_kib = max(peak.rss_sum_kib, sum(r for _, r in stats))


def run(vehicles: int, secondaries: int, workers: int | None) -> dict[str, float]:
    args = [UPTANE, "sim", "--vehicles", str(vehicles), "--secondaries", str(secondaries)]
    args += ["--update-to", "2", "--json"]
    if workers is not None:
        args += ["--workers", str(workers)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak, stop = Sample(), threading.Event()
    watcher = threading.Thread(target=_watch, args=(proc.pid, peak, stop), daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    wall = time.monotonic() - start
    stop.set()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report = json.loads(out)
    updates = sum(p["updated"] for p in report["phases"])
    return {
        "vehicles": vehicles,
        "ok": bool(report["ok"] and proc.returncode == 0),
        "updated": report["ecus_updated"],
        "total": report["ecus_total"],
        "updates": updates,
        "wall": wall,
        "cpu": cpu,
        "cpu_per_update": cpu / max(1, updates),
        "wall_per_update": wall / max(1, updates),
        "threads_max": peak.threads_max,
        "threads_sum": peak.threads_sum,
        "rss_mib": peak.rss_sum_kib / 1024,
        "workers": report["config"]["workers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,50,200", help="fleet sizes (vehicles)")
    parser.add_argument("--secondaries", type=int, default=4)
    parser.add_argument("--workers", type=int, default=None, help="default: one per core")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    print(
        f"{'vehicles':>8} {'ECUs v2':>9} {'workers':>7} {'wall s':>8} {'CPU s':>8} "
        f"{'CPU s/upd':>9} {'wall s/upd':>10} {'thr max':>7} {'thr sum':>7} {'RSS MiB':>8}",
        flush=True,
    )
    rows = []
    for n in sizes:
        r = run(n, args.secondaries, args.workers)
        rows.append(r)
        print(
            f"{n:>8} {r['updated']:>4}/{r['total']:<4} {r['workers']:>7} {r['wall']:>8.1f} "
            f"{r['cpu']:>8.1f} {r['cpu_per_update']:>9.4f} {r['wall_per_update']:>10.4f} "
            f"{r['threads_max']:>7} {r['threads_sum']:>7} {r['rss_mib']:>8.0f}"
            + ("" if r["ok"] else "  NOT CONVERGED"),
            flush=True,
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(
        f"ratio={rows[-1]['cpu_per_update'] / rows[0]['cpu_per_update']:.3f} "
        f"(CPU-s per ECU update at {sizes[-1]} vehicles / at {sizes[0]})"
    )


if __name__ == "__main__":
    main()
