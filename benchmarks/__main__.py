"""Run the benchmark suite: every workload on every contestant, side by side.

    python -m benchmarks                 # everything (about 10 minutes on 2 cores)
    python -m benchmarks --only W1,W2    # some workloads
    python -m benchmarks --quick         # smaller inputs, one repeat: a smoke test

Each cell runs in a fresh interpreter (``benchmarks.cell``). Reported per cell: the median
of the wall times, items/s, efficiency against the machine's limit, peak RSS of the
process tree. The table is printed and written as JSON and Markdown to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.workloads import calibrate

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

PROCESS = [
    "serial",
    "mp_fused",
    "mp_nested",
    "concurrent_futures",
    "mpire",
    "pypeln",
    "dask_bag",
    "papy",
]
THREADS = [
    "threads_nested",
    "mp_threads_nested",
    "mpire_threads",
    "pypeln_threads",
    "dask_bag_threads",
    "papy_threads",
]

# workload -> (items, contestants, kind of limit, note)
SUITE: dict[str, dict[str, Any]] = {
    "W1": {
        "n": 200_000,
        "who": [*PROCESS, "papy_journal"],
        "limit": "serial",
        "what": "3 trivial 1:1 stages over 200,000 ints",
        "n_for": {"pypeln": 20_000},
    },
    "W2": {"n": 2_000, "who": PROCESS, "limit": "cpu", "what": "2 stages of 1 ms CPU"},
    "W3": {
        "n": 1_000,
        "who": THREADS,
        "limit": "io",
        "what": "2 stages sleeping 10 ms, 32 threads",
        "workers": 32,
    },
    "W4": {
        "n": 2_000,
        "who": PROCESS,
        "limit": "cpu",
        "what": "stage A 0.5 ms, stage B 2 ms CPU, one shared pool",
    },
    "W5": {
        "n": 2_000_000,
        "who": ["serial", "mp_nested", "papy"],
        "limit": "serial",
        "what": "2,000,000 items from a generator, peak RSS of the tree",
        "also": 200_000,
    },
    "W6": {
        "n": 1_000,
        "who": [*PROCESS, "papy_split_pools", "papy_split_files"],
        "limit": "cpu",
        "what": "stage A makes a 1 MiB array, stage B reduces it",
    },
    "W7": {
        "n": 50,
        "who": ["serial", "mp_fused", "concurrent_futures", "mpire", "pypeln", "dask_bag", "papy"],
        "limit": "cpu",
        "what": "50 items x 40 sub-items of 1 ms, gathered per item",
    },
    "J1": {
        "n": 50_000,
        "who": [
            "serial",
            "papy",
            "papy_journal",
            "papy_journal_resume",
            "papy_journal_cache",
        ],
        "limit": "serial",
        "what": "the journal's cost: W1's 3 trivial stages over 50,000 ints without a "
        "journal, with one (first run), resumed with every item done, and with cache=True",
    },
    "W8": {
        "n": 2_000,
        "who": ["serial", "dask_futures", "dask_bag_distributed", "papy_dask"],
        "limit": "cpu",
        "what": "W2 on a 2-worker local Dask cluster",
    },
}


def run_cell(
    workload: str, contestant: str, n: int, repeats: int, workers: int, env: dict[str, str]
) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "benchmarks.cell",
        workload,
        contestant,
        str(n),
        "--repeats",
        str(repeats),
        "--workers",
        str(workers),
    ]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=900, env=env, cwd=HERE.parent
        )
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--only", default="", help="comma-separated workloads (W1,W2,...)")
    ap.add_argument("--quick", action="store_true", help="small inputs, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    loops = calibrate()
    env = {
        **os.environ,
        "PAPY_BENCH_LOOPS": str(loops),
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    only = [w.strip() for w in args.only.split(",") if w.strip()] or list(SUITE)
    repeats = 1 if args.quick else args.repeats
    machine = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": cores,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "loops_per_ms": loops,
    }
    print(f"machine: {machine}", flush=True)
    results: dict[str, Any] = {"machine": machine, "workloads": {}}
    for wl in only:
        spec = SUITE[wl]
        workers = spec.get("workers", cores)
        sizes = [spec["n"]] + ([spec["also"]] if "also" in spec else [])
        rows = []
        serial_time = None
        for n in sizes:
            n_run = max(1, n // 20) if args.quick else n
            # Round robin: one timed run of each contestant per round, so a machine that
            # gets slower or faster during the suite shifts every contestant alike.
            cells: dict[str, dict[str, Any]] = {}
            for _ in range(repeats):
                for who in spec["who"]:
                    m = min(spec.get("n_for", {}).get(who, n_run), n_run)
                    cell = run_cell(wl, who, m, 1, workers, env)
                    acc = cells.setdefault(who, {"n": m, "times": [], "peak_rss": 0, "ok": True})
                    if "error" in cell:
                        acc["error"] = cell["error"]
                        continue
                    acc["times"] += cell["times"]
                    acc["peak_rss"] = max(acc["peak_rss"], cell["peak_rss"])
                    acc["ok"] = acc["ok"] and cell["ok"]
            for who, acc in cells.items():
                row: dict[str, Any] = {"contestant": who, **acc}
                if acc["times"] and "error" not in acc:
                    med = statistics.median(acc["times"])
                    row["median_s"] = med
                    row["items_per_s"] = acc["n"] / med
                    if who == "serial" and n == sizes[0]:
                        serial_time = med * (n_run / acc["n"])
                else:
                    row.setdefault("error", "no run")
                rows.append(row)
                print(_line(wl, row), flush=True)
        for row in rows:
            row["efficiency"] = _efficiency(spec, row, serial_time, cores, workers)
        results["workloads"][wl] = {"what": spec["what"], "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for path in (RESULTS / f"{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    (RESULTS / "latest.md").write_text(md)
    print()
    print(md)


def _efficiency(
    spec: dict[str, Any], row: dict[str, Any], serial_time: float | None, cores: int, workers: int
) -> float | None:
    """Return the limit time over the measured time (1.0 = the machine's limit)."""
    if "median_s" not in row:
        return None
    n = row["n"]
    if spec["limit"] == "io":
        limit = 0.010 * 2 * n / workers
    elif serial_time is None:
        return None
    else:
        per_item = serial_time / spec["n"]
        limit = per_item * n / (1 if spec["limit"] == "serial" else cores)
    return limit / row["median_s"]


def _line(wl: str, row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{wl} {row['contestant']:<22} n={row['n']:<9} ERROR {row['error']}"
    return (
        f"{wl} {row['contestant']:<22} n={row['n']:<9} {row['median_s']:8.3f} s "
        f"{row['items_per_s']:>12,.0f} items/s  rss {row['peak_rss'] / 2**20:7.1f} MiB  "
        f"{'ok' if row['ok'] else 'WRONG OUTPUT'}"
    )


def to_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    out = [
        f"Machine: {m['cores']} cores, {m['processor']}, Python {m['python']}, "
        f"{m['platform']}; run {m['date']}.",
        "",
    ]
    for wl, data in results["workloads"].items():
        out.append(f"**{wl}**: {data['what']}")
        out.append("")
        out.append(
            "| contestant | items | median s | runs (s) | items/s | efficiency "
            "| peak RSS MiB | ok |"
        )
        out.append("|---|---:|---:|---|---:|---:|---:|---|")
        for r in data["rows"]:
            if "error" in r:
                out.append(f"| {r['contestant']} | {r['n']:,} | - | - | - | - | - | {r['error']} |")
                continue
            eff = f"{r['efficiency']:.2f}" if r.get("efficiency") is not None else "-"
            runs = " ".join(f"{t:.3f}" for t in r["times"])
            out.append(
                f"| {r['contestant']} | {r['n']:,} | {r['median_s']:.3f} | {runs} | "
                f"{r['items_per_s']:,.0f} | {eff} | {r['peak_rss'] / 2**20:.0f} | "
                f"{'yes' if r['ok'] else 'NO'} |"
            )
        out.append("")
        if wl == "J1":
            out += [_journal_cost(data["rows"]), ""]
    return "\n".join(out)


def _journal_cost(rows: list[dict[str, Any]]) -> str:
    """Say what the journal adds per item, from the J1 medians (microseconds)."""
    med = {r["contestant"]: r["median_s"] / r["n"] for r in rows if "median_s" in r}
    base = med.get("papy")
    if base is None:
        return ""
    parts = [
        f"{label} {(med[who] - base) * 1e6:+.1f} us/item"
        for who, label in (
            ("papy_journal", "journal, first run:"),
            ("papy_journal_cache", "cache=True on 3 nodes, first run:"),
        )
        if who in med
    ]
    if "papy_journal_resume" in med:
        parts.append(f"resuming a finished item: {med['papy_journal_resume'] * 1e6:.1f} us/item")
    return "Journal cost per item (against papy without one): " + "; ".join(parts) + "."


if __name__ == "__main__":
    main()
