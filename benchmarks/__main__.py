"""Run the benchmark suite: every workload on every contestant, side by side.

    python -m benchmarks                   # everything (about 15 minutes on 2 cores)
    python -m benchmarks --only W1,W2      # some workloads
    python -m benchmarks --peers limit,papy  # some contestants (--skip ray_data: all but)
    python -m benchmarks --quick           # a twentieth of the items, one round: a smoke test

Each cell runs in a fresh interpreter (``benchmarks.cell``), checks its output on a tenth
of the items before the clock and on every timed run (a wrong output is reported as WRONG
and never timed). Reported per cell: the median of the wall times, items/s, efficiency
against the "limit" row (the same CPU work on two plain processes, timed in the same
round) and against the ideal (serial time / cores), peak RSS of the process tree, the
load average, and the share of the machine other programs took during the cells
(``benchmarks.others``: the load average counts the suite's own processes), with a loud
warning when it is above 10%. The table is printed and written
as JSON and Markdown to ``benchmarks/results/``: ``latest.*`` for a full run, ``quick.*``
for ``--quick``, ``partial.*`` for a run with ``--only``, ``--peers`` or ``--skip``.
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

from benchmarks import others
from benchmarks.workloads import calibrate

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

PROCESS = [
    "limit",
    "serial",
    "mp_fused",
    "mp_nested",
    "concurrent_futures",
    "mpire",
    "pypeln",
    "dask_bag",
    "joblib",
    "papy",
]
THREADS = [
    "threads_nested",
    "mp_threads_nested",
    "mpire_threads",
    "pypeln_threads",
    "dask_bag_threads",
    "joblib_threads",
    "papy_threads",
]
# Ray Data starts a local Ray instance (about 25 s on a loaded 2-core machine) and new actor
# pools for every run (most of its time below a few seconds of work): it runs where the
# comparison means most, and all its timed runs share one interpreter (one cell).
RAY = "ray_data"
ONE_CELL = {RAY}

# workload -> items, contestants, kind of limit ("cpu": the limit row and cores x serial;
# "serial": the serial time; "io": sleep per item x items / threads), what it is.
SUITE: dict[str, dict[str, Any]] = {
    "W1": {
        "n": 200_000,
        "who": [*PROCESS, "papy_journal"],
        "limit": "serial",
        "what": "3 trivial 1:1 stages over 200,000 ints",
        # Both pay per item dispatch (pypeln: 14 s for 20,000): fewer items, same per item.
        "n_for": {"pypeln": 5_000, "joblib": 20_000},
    },
    "W2": {
        "n": 2_000,
        "who": [*PROCESS, RAY],
        "limit": "cpu",
        "what": "2 stages of 1 ms CPU",
        "n_for": {"serial": 500, "pypeln": 1_000},
    },
    "W3": {
        "n": 1_000,
        "who": THREADS,
        "limit": "io",
        "io_s": 0.020,
        "what": "2 stages sleeping 10 ms, 32 threads",
        "workers": 32,
    },
    "W4": {
        "n": 2_000,
        "who": PROCESS,
        "limit": "cpu",
        "what": "stage A 0.5 ms, stage B 2 ms CPU, one shared pool",
        "n_for": {"serial": 500, "pypeln": 1_000},
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
        # Both copy every array through pipes twice (7 s and 4 s, 1.3 GB for nested imap).
        "n_for": {"mp_nested": 250, "pypeln": 250},
    },
    "W7": {
        "n": 50,
        "who": [
            "limit",
            "serial",
            "mp_fused",
            "concurrent_futures",
            "mpire",
            "pypeln",
            "dask_bag",
            "joblib",
            RAY,
            "papy",
        ],
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
        "who": ["limit", "serial", "dask_futures", "dask_bag_distributed", "papy_dask"],
        "limit": "cpu",
        "what": "W2 on a 2-worker local Dask cluster",
        "n_for": {"serial": 500},
    },
    "W9": {
        "n": 2_000,
        "who": ["limit", "serial_cpu", "concurrent_futures", "mp_pools", "joblib", RAY, "papy"],
        "limit": "cpu",
        "base": "serial_cpu",
        "what": "stage A sleeps 10 ms on a thread pool, stage B 2 ms CPU on a process pool, "
        "no worker counts given; limit = the CPU stage alone",
        # One thread per core (multiprocessing, joblib) sleeps 10 ms per item: 10 s for 2,000;
        # Ray's I/O stage has one actor per CPU, and 2 CPUs for both stages.
        "n_for": {"serial_cpu": 500, "mp_pools": 500, "joblib": 500, RAY: 500},
    },
    "W10": {
        "n": 2_000,
        "who": ["threads_nested", "mp_threads_nested", "dask_bag_threads", "papy_threads"],
        "limit": "io",
        "io_s": 0.006,
        "what": "3 sibling nodes sleeping 1, 2, 3 ms on one pool of 8 threads, joined per "
        "item; first 10% = time to the first 10% of the outputs over the total",
        "workers": 8,
    },
}
#: share of the machine other programs may take during a cell before the figures of that
#: workload are flagged: measured with nothing else running, cells show 2-11% (the
#: kernel's work for them, processes reaped outside the suite's accounting)
OTHERS_WARN = 0.10
#: contestants whose processes' CPU the suite cannot see (Ray's reap their children
#: without passing their CPU time on: 13.7 s of a 27.9 s W2 cell, nothing else running)
UNSEEN = {"ray_data"}


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


def _load() -> float:
    return os.getloadavg()[0]


def _warn_others(when: str, used: float | None) -> None:
    if used is not None and used > OTHERS_WARN:
        bar = "!" * 78
        print(
            f"{bar}\n!! WARNING: other programs took {used:.0%} of the machine {when} (more "
            f"than {OTHERS_WARN:.0%}):\n!! these figures are NOT a measurement of the "
            f"contestants.\n{bar}",
            flush=True,
        )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--only", default="", help="comma-separated workloads (W1,W2,...)")
    ap.add_argument("--peers", default="", help="comma-separated contestants (limit,papy,...)")
    ap.add_argument("--skip", default="", help="comma-separated contestants to leave out")
    ap.add_argument("--quick", action="store_true", help="small inputs, one repeat")
    ap.add_argument("--repeats", type=int, default=3)
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Read the command line (``argv``; None: ``sys.argv``)."""
    return _parser().parse_args(argv)


def main() -> None:
    ap = _parser()
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    load_start = _load()
    others.adopt_orphans()  # the cells' leftovers are reaped here: their CPU time is ours
    loops = calibrate()
    env = {
        **os.environ,
        "PAPY_BENCH_LOOPS": str(loops),
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    only = [w.strip() for w in args.only.split(",") if w.strip()] or list(SUITE)
    unknown = [w for w in only if w not in SUITE]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(SUITE)}")
    peers = {p.strip() for p in args.peers.split(",") if p.strip()}
    skip = {p.strip() for p in args.skip.split(",") if p.strip()}
    known = {c for spec in SUITE.values() for c in spec["who"]}
    if (peers | skip) - known:
        ap.error(
            f"unknown contestant(s) {', '.join(sorted((peers | skip) - known))}; "
            f"known: {', '.join(sorted(known))}"
        )
    repeats = 1 if args.quick else args.repeats
    machine: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": cores,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "loops_per_ms": loops,
        "repeats": repeats,
        "quick": args.quick,
        "load_start": load_start,
    }
    print(f"machine: {machine}", flush=True)
    results: dict[str, Any] = {"machine": machine, "workloads": {}}
    t_suite = time.perf_counter()
    for wl in only:
        spec = SUITE[wl]
        workers = spec.get("workers", cores)
        who_all = [c for c in spec["who"] if (not peers or c in peers) and c not in skip]
        sizes = [spec["n"]] + ([spec["also"]] if "also" in spec else [])
        rows = []
        load_wl = [_load()]
        used: list[tuple[float, str]] = []  # the share of the machine others took, per cell
        for n in sizes:
            n_run = max(1, n // 20) if args.quick else n
            # Round robin: one timed run of each contestant per round, so a machine that
            # gets slower or faster during the suite shifts every contestant alike; the
            # limit runs first in each round.
            cells: dict[str, dict[str, Any]] = {}
            for rnd in range(repeats):
                for who in who_all:
                    if who in ONE_CELL and rnd > 0:
                        continue
                    reps = repeats if who in ONE_CELL else 1
                    m = min(spec.get("n_for", {}).get(who, n_run), n_run)
                    t_cell = time.perf_counter()
                    before = others.sample()
                    cell = run_cell(wl, who, m, reps, workers, env)
                    share = others.share(before, cores)
                    acc = cells.setdefault(
                        who,
                        {"n": m, "times": [], "peak_rss": 0, "ok": True, "load": [], "cell_s": 0.0},
                    )
                    if share is not None and who not in UNSEEN:
                        used.append((share, who))
                        acc["others"] = max(acc.get("others", 0.0), share)
                    acc["cell_s"] += time.perf_counter() - t_cell  # wall time, start-up included
                    if "error" in cell:
                        acc["error"] = cell["error"]
                        continue
                    acc["times"] += cell["times"]
                    acc["peak_rss"] = max(acc["peak_rss"], cell["peak_rss"])
                    acc["load"] += cell.get("load", [])
                    if not cell["ok"]:
                        acc["ok"] = False
                        acc["wrong"] = cell.get("wrong", "wrong output")
                    if "first_10pct" in cell:
                        acc.setdefault("first_10pct", []).extend(cell["first_10pct"])
            for who, acc in cells.items():
                row: dict[str, Any] = {"contestant": who, **acc}
                if not acc["ok"]:
                    row["times"] = []  # a wrong answer is never timed
                elif acc["times"] and "error" not in acc:
                    med = statistics.median(acc["times"])
                    row["median_s"] = med
                    row["items_per_s"] = acc["n"] / med
                    if "first_10pct" in acc:
                        row["first_10pct_s"] = statistics.median(acc["first_10pct"])
                        row["first_10pct_frac"] = statistics.median(
                            f / t for f, t in zip(acc["first_10pct"], acc["times"])
                        )
                else:
                    row.setdefault("error", "no run")
                row["size"] = n
                rows.append(row)
        load_wl.append(_load())
        _efficiencies(spec, rows, cores, workers)
        for row in rows:
            print(_line(wl, row), flush=True)
        most, most_who = max(used, default=(None, ""))
        _warn_others(f"during a cell of {wl} ({most_who})", most)
        results["workloads"][wl] = {
            "what": spec["what"],
            "rows": rows,
            "load": load_wl,
            "others": most,
            "others_cell": most_who,
        }
    machine["load_end"] = _load()
    machine["suite_s"] = time.perf_counter() - t_suite
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = results_name(args)
    for path in (RESULTS / f"{stamp}.json", RESULTS / f"{name}.json"):
        path.write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    (RESULTS / f"{name}.md").write_text(md)
    print()
    print(md)
    print(f"suite: {machine['suite_s']:.0f} s", flush=True)
    busiest = _busiest(results)
    if busiest is not None:
        _warn_others(f"during a cell of {busiest[0]}", busiest[1])


def results_name(args: argparse.Namespace) -> str:
    """Name the files a run writes: a smoke test (``--quick``) or a run of some workloads or
    contestants never replaces the recorded full run (``latest``)."""
    if args.quick:
        return "quick"
    return "partial" if args.only or args.peers or args.skip else "latest"


def _efficiencies(
    spec: dict[str, Any], rows: list[dict[str, Any]], cores: int, workers: int
) -> None:
    """Set each row's ``vs_ideal`` (ideal time / its time) and ``vs_limit`` (the limit row's
    time for the same items / its time; 1.0 = as fast as two plain processes).

    The ideal: for CPU work the serial time divided by the cores (W9: the CPU stage alone),
    for I/O the sleep time of an item times the items divided by the threads, for W1 and
    W5 the serial time itself. The limit is compared round by round when both rows ran in
    the same rounds (a round that was slow for everyone cancels out), else by medians.
    """
    base_name = spec.get("base", "serial")
    for size in sorted({r["size"] for r in rows}):
        group = [r for r in rows if r["size"] == size]
        by = {r["contestant"]: r for r in group}
        base = by.get(base_name)
        per_item_serial = base["median_s"] / base["n"] if base and "median_s" in base else None
        lim = by.get("limit")
        lim_ok = lim is not None and "median_s" in lim
        for r in group:
            r["vs_ideal"] = None
            r["vs_limit"] = None
            if "median_s" not in r:
                continue
            ideal = None
            if spec["limit"] == "io":
                ideal = spec["io_s"] * r["n"] / workers
            elif per_item_serial is not None:
                ideal = per_item_serial * r["n"] / (cores if spec["limit"] == "cpu" else 1)
            if ideal is not None:
                r["vs_ideal"] = ideal / r["median_s"]
            if lim_ok and lim is not None:
                lt, rt = lim["times"], r["times"]
                scale = r["n"] / lim["n"]
                if len(lt) == len(rt):
                    r["vs_limit"] = statistics.median(a * scale / b for a, b in zip(lt, rt))
                else:
                    r["vs_limit"] = lim["median_s"] * scale / r["median_s"]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _line(wl: str, row: dict[str, Any]) -> str:
    head = f"{wl:<3} {row['contestant']:<20} n={row['n']:<9}"
    if not row["ok"]:
        return f"{head} WRONG ({row.get('wrong', 'wrong output')}): not timed"
    if "error" in row:
        return f"{head} ERROR {row['error']}"
    first = ""
    if "first_10pct_s" in row:
        first = f"  first 10% {row['first_10pct_s']:.3f} s ({row['first_10pct_frac']:.2f})"
    return (
        f"{head} {row['median_s']:8.3f} s {row['items_per_s']:>11,.0f} items/s  "
        f"vs limit {_fmt(row['vs_limit']):>5}  vs ideal {_fmt(row['vs_ideal']):>5}  "
        f"rss {row['peak_rss'] / 2**20:6.1f} MiB  ok{first}"
    )


BASES = ("limit", "serial", "serial_cpu")


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def summary(results: dict[str, Any]) -> list[str]:
    """One line per workload: what the machine gave (the limit against the ideal), PaPy and
    the best peer against the limit (against the ideal where there is no limit row)."""
    out = [
        "| workload | limit vs ideal | PaPy | vs limit | vs ideal | best peer | vs limit "
        "| vs ideal | load average | others' CPU |",
        "|---|---:|---|---:|---:|---|---:|---:|---|---:|",
    ]
    for wl, data in results["workloads"].items():
        rows = [r for r in data["rows"] if r.get("size", 0) == data["rows"][0].get("size", 0)]
        timed = [r for r in rows if "median_s" in r]
        lim = next((r for r in timed if r["contestant"] == "limit"), None)
        papy = next((r for r in timed if r["contestant"].startswith("papy")), None)
        key = "vs_limit" if lim else "vs_ideal"
        peers = [
            r
            for r in timed
            if r["contestant"] not in BASES
            and not r["contestant"].startswith("papy")
            and r.get(key) is not None
        ]
        best = max(peers, key=lambda r: r[key], default=None)

        def cells(r: dict[str, Any] | None) -> str:
            if r is None:
                return "- | - | -"
            extra = f" (first 10%: {r['first_10pct_frac']:.2f})" if "first_10pct_frac" in r else ""
            return f"{r['contestant']}{extra} | {_fmt(r['vs_limit'])} | {_fmt(r['vs_ideal'])}"

        lw = data.get("load", [0, 0])
        out.append(
            f"| {wl} | {_fmt(lim['vs_ideal']) if lim else '-'} | {cells(papy)} | {cells(best)} "
            f"| {lw[0]:.2f} -> {lw[-1]:.2f} | {_share(data.get('others'))} |"
        )
    out.append("")
    return out


def _busiest(results: dict[str, Any]) -> tuple[str, float] | None:
    """Return the workload whose cells other programs took most of the machine in, and
    that share; None if it was never measured."""
    shares = [
        (f"{wl} {d['others_cell']}" if d.get("others_cell") else wl, d["others"])
        for wl, d in results["workloads"].items()
        if d.get("others")
    ]
    return max(shares, key=lambda x: x[1], default=None)


def to_markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    load = f"load average {m['load_start']:.2f} at the start, {m.get('load_end', 0):.2f} at the end"
    busiest = _busiest(results)
    if busiest is not None:
        load += (
            f"; other programs took at most {busiest[1]:.1%} of the machine during a cell "
            f"({busiest[0]})"
        )
    out = [
        f"Machine: {m['cores']} cores, {m['processor']}, Python {m['python']}, "
        f"{m['platform']}; run {m['date']}, {m['repeats']} round(s)"
        f"{', quick (a twentieth of the items)' if m.get('quick') else ''}; {load}.",
        "",
    ]
    if busiest is not None and busiest[1] > OTHERS_WARN:
        out += [
            f"**WARNING: other programs took more than {OTHERS_WARN:.0%} of the machine "
            f"during a cell of {busiest[0]} ({busiest[1]:.0%}): its figures do not measure "
            "the contestants.**",
            "",
        ]
    out += summary(results)
    for wl, data in results["workloads"].items():
        lw = data.get("load", [0, 0])
        out.append(f"**{wl}**: {data['what']} (load average {lw[0]:.2f} -> {lw[-1]:.2f})")
        out.append("")
        w10 = any("first_10pct_s" in r for r in data["rows"])
        extra = " first 10% s (of total) |" if w10 else ""
        out.append(
            "| contestant | items | median s | runs (s) | items/s | vs limit | vs ideal "
            f"| peak RSS MiB | ok |{extra}"
        )
        out.append("|---|---:|---:|---|---:|---:|---:|---:|---|" + ("---:|" if w10 else ""))
        for r in data["rows"]:
            if not r["ok"] or "error" in r:
                what = "WRONG" if not r["ok"] else r["error"]
                out.append(
                    f"| {r['contestant']} | {r['n']:,} | - | - | - | - | - | - | {what} |"
                    + (" - |" if w10 else "")
                )
                continue
            runs = " ".join(f"{t:.3f}" for t in r["times"])
            first = ""
            if w10:
                first = (
                    f" {r['first_10pct_s']:.3f} ({r['first_10pct_frac']:.2f}) |"
                    if "first_10pct_s" in r
                    else " - |"
                )
            out.append(
                f"| {r['contestant']} | {r['n']:,} | {r['median_s']:.3f} | {runs} | "
                f"{r['items_per_s']:,.0f} | {_fmt(r['vs_limit'])} | {_fmt(r['vs_ideal'])} | "
                f"{r['peak_rss'] / 2**20:.0f} | yes |{first}"
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
