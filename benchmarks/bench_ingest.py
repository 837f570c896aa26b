"""Scale benchmark of the data stages: generate -> ingest -> sessions -> split, plus a pandas sessioniser.

Each stage runs in its own subprocess so its peak RSS is its own (``os.wait4`` rusage of that child);
events/s is timed inside the child around the stage call only (imports excluded), beside the CPU seconds
of that call (all threads: on a busy machine, CPU time says how much work a stage did, wall time how long
it waited for the cores too). A straightforward pandas
sessioniser (sort by user and time, gap -> session ids, groupby with list aggregation) runs on the first
size for comparison with ``recsys.data.sessions.build_sessions``.

    .venv/bin/python benchmarks/bench_ingest.py                 # 10M and 50M events (long: minutes)
    .venv/bin/python benchmarks/bench_ingest.py --sizes 200k    # smoke run
    .venv/bin/python benchmarks/bench_ingest.py --sizes 10M --profile   # + cProfile of each stage

Storage comparison (issue 12), in the same run on the same generated files: ``ingest`` writes the Delta
events table (one commit per run); ``ingest-hive`` runs the previous layout (hive Parquet, one atomic
file swap per date partition), i.e. the ``recsys`` package of ``--baseline`` (a git ref, default the last
commit with that layout, extracted with ``git archive``), into its own data root; ``reingest`` ingests
the same files into the Delta table again (merge mode: every row is a duplicate, nothing is written: the
idempotence cost).

    .venv/bin/python benchmarks/bench_ingest.py --sizes 10M,50M

Targets (issues 2, 12): the ingest stage (Delta table) >= 1.5M events/s at 10M events, measured in the
same run as the previous (hive) layout; 50M events with peak RSS <= 6 GB; ours >= 5x faster than the
pandas sessioniser. The ingest->sessions->split rate is printed beside them as information.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("generate", "ingest", "sessions", "split")
EXTRA_STAGES = ("ingest-hive", "reingest")  # storage comparison, after the pipeline stages
INGEST_TARGET_EPS = 1_500_000  # the ingest stage, events/s at 10M
TARGET_SIZE = 10_000_000
RSS_TARGET_GB = 6.0  # peak RSS of any stage at 50M
PANDAS_RATIO_TARGET = 5.0
PANDAS_STOP_RATIO = 20.0  # stop pandas once it is this many times slower: the ratio is then "> 20x"


def parse_size(text: str) -> int:
    """'200k' -> 200_000, '10M' -> 10_000_000, '1.5M', '2e6'."""
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "kmgb" else text
    return int(float(number) * scale)


def label(n: int) -> str:
    for div, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


# --- child side: run one stage and print its result as JSON -----------------------------------------

def _child_config(work: Path, n_events: int, sets: list[str]):
    import recsys
    from recsys.config import load_config

    conf = Path(recsys.__file__).resolve().parents[1] / "conf"  # the baseline's own conf for ingest-hive
    return load_config(conf, [f"paths.data_root={work}", f"generate.n_events={n_events}", *sets])


def _timed(fn: Any, *args: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of all threads): CPU time tells work from waiting on a busy box."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args)
    return result, time.perf_counter() - t0, time.process_time() - c0


def _run_stage(stage: str, work: Path, n_events: int, sets: list[str]) -> dict[str, Any]:
    config = _child_config(work, n_events, sets)
    if stage == "generate":
        from recsys.data.synthetic import generate

        res, secs, cpu = _timed(generate, config)
        (work / "generated.json").write_text(json.dumps(res))
        return {"events": res["events"], "seconds": secs, "cpu_seconds": cpu,
                "detail": {"files": len(res["files"])}}
    if stage in ("ingest", "ingest-hive", "reingest"):
        from recsys.data.ingest import ingest_files

        files = [Path(f) for f in json.loads((work / "generated.json").read_text())["files"]]
        if stage == "ingest-hive":  # the previous layout, into its own data root
            config = _child_config(work / "hive", n_events, sets)
        rep, secs, cpu = _timed(ingest_files, files, config)
        d = rep.to_dict()
        return {"events": d["rows_in"], "seconds": secs, "cpu_seconds": cpu,
                "detail": {"events_written": d["events_written"], "duplicates": d["duplicates"],
                           "quarantined": sum(d["quarantined"].values()),
                           "partitions": len(d["partitions"]), "table_version": d.get("table_version")}}
    if stage == "sessions":
        from recsys.data.sessions import build_sessions

        st, secs, cpu = _timed(build_sessions, config)
        return {"events": st["events_in"], "seconds": secs, "cpu_seconds": cpu,
                "detail": {"sessions": st["sessions"], "events_kept": st["events"]}}
    if stage == "split":
        from recsys.data.split import split_sessions

        st, secs, cpu = _timed(split_sessions, config)
        return {"events": st["sequences"]["events"], "seconds": secs, "cpu_seconds": cpu,
                "detail": {"vocab": st["vocab_size"],
                           **{f"{k}_sequences": v["sequences"] for k, v in st["splits"].items()}}}
    if stage == "pandas":
        return _pandas_sessionise(config)
    raise ValueError(f"unknown stage {stage}")


def _pandas_sessionise(config) -> dict[str, Any]:
    """The straightforward way: read, sort by (user, ts), gap -> session ids, groupby lists, write."""
    import pandas as pd

    gap = pd.Timedelta(minutes=config.sessions.gap_minutes)
    out = config.paths.data_root / "sessions_pandas.parquet"
    from_end = config.sessions.gap_from_end  # same rule as ours: inactivity from the end of the play
    t0 = time.perf_counter()
    cols = ["user_id", "item_id", "ts", *(["watch_seconds"] if from_end else [])]
    df = pd.read_parquet(config.paths.events_dir, columns=cols)
    df = df.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    prev_end = df["ts"].shift()
    if from_end:
        watched = df["watch_seconds"].fillna(0).clip(lower=0)
        prev_end = prev_end + pd.to_timedelta(watched.shift(), unit="s")
    new = (df["user_id"] != df["user_id"].shift()) | ((df["ts"] - prev_end) > gap)
    df["session_id"] = new.cumsum() - 1
    sessions = df.groupby("session_id", sort=True).agg(
        user_id=("user_id", "first"), start_ts=("ts", "min"), end_ts=("ts", "max"),
        items=("item_id", list), ts=("ts", list))
    sessions = sessions[sessions["items"].map(len) >= config.sessions.min_length]
    sessions.reset_index().to_parquet(out)
    secs = time.perf_counter() - t0
    return {"events": len(df), "seconds": secs, "detail": {"sessions": len(sessions)}}


def child_main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.profile_to:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        result = prof.runcall(_run_stage, args.stage, work, args.size, args.set or [])
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
        Path(args.profile_to).write_text(buf.getvalue())
    else:
        result = _run_stage(args.stage, work, args.size, args.set or [])
    print("RESULT " + json.dumps(result), flush=True)


# --- parent side -------------------------------------------------------------------------------------

def parse_deadline(text: str) -> float:
    """'10:25' -> the next such time today (UTC) as a unix timestamp."""
    hh, mm = (int(x) for x in text.split(":"))
    now = time.time()
    day = now - now % 86_400
    return day + hh * 3600 + mm * 60


def estimate_seconds(rows: list[dict[str, Any]], stage: str, n: int) -> float | None:
    """From the same stage at the largest smaller size: linear in events, +20 % and start-up."""
    done = [r for r in rows if r["stage"] == stage and not r.get("skipped") and r["size"] < n]
    if not done:
        return None
    ref = max(done, key=lambda r: r["size"])
    startup = ref["wall_seconds"] - ref["seconds"]
    return 1.2 * ref["seconds"] * n / ref["size"] + startup + 5

def extract_baseline(ref: str, dest: Path) -> Path:
    """The ``recsys`` package and ``conf`` of git ``ref``, extracted to ``dest`` (for ingest-hive)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref, "recsys", "conf"], cwd=REPO, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def run_child(stage: str, work: Path, n: int, sets: list[str], profile: Path | None,
              timeout: float | None = None, pythonpath: Path | None = None) -> dict[str, Any]:
    """Run one stage in a fresh process; a stage past ``timeout`` is killed and reported as timed out."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", stage, "--work", str(work),
           "--size", str(n)]
    for s in sets:
        cmd += ["--set", s]
    if profile is not None:
        cmd += ["--_profile-to", str(profile)]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(pythonpath or REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=env)
    deadline = t0 + timeout if timeout else None
    while True:  # rusage of this child alone (wait4): its own peak RSS
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
        if pid:
            break
        if time.perf_counter() > deadline:  # type: ignore[operator]
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            return {"stage": stage, "size": n, "events": n, "seconds": round(wall, 2), "timed_out": True,
                    "wall_seconds": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3),
                    "events_per_second": round(n / wall), "load_before": round(load_before, 2),
                    "load_after": round(os.getloadavg()[0], 2), "detail": {}}
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"stage {stage} at {label(n)} failed (exit {code}):\n{err[-4000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(stage=stage, size=n, wall_seconds=round(wall, 2),
                  peak_rss_gb=round(usage.ru_maxrss * 1024 / 1e9, 3),  # ru_maxrss is KiB on Linux
                  events_per_second=round(result["events"] / result["seconds"]),
                  load_before=round(load_before, 2), load_after=round(os.getloadavg()[0], 2))
    result["seconds"] = round(result["seconds"], 2)
    if "cpu_seconds" in result:
        result["cpu_seconds"] = round(result["cpu_seconds"], 2)
    return result


def summarise(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    ran = [r for r in rows if not r.get("skipped")]
    complete = {(r["size"], r["stage"]): r for r in ran if not r.get("timed_out")}
    summary: dict[str, Any] = {"ingest": {}, "path": {}, "peak_rss_gb": {}}
    for n in sizes:
        ing = complete.get((n, "ingest"))
        if ing:
            summary["ingest"][label(n)] = {
                "events": ing["events"], "seconds": ing["seconds"],
                "events_per_second": ing["events_per_second"], "peak_rss_gb": ing["peak_rss_gb"],
                "target_met": ing["events_per_second"] >= INGEST_TARGET_EPS if n == TARGET_SIZE else None,
            }
        stage_rss = [r["peak_rss_gb"] for r in ran if r["size"] == n and r["stage"] in STAGES]
        if stage_rss:  # generate included, the pandas comparison not: the pipeline's own peak
            summary["peak_rss_gb"][label(n)] = max(stage_rss)
        parts = [complete.get((n, s)) for s in ("ingest", "sessions", "split")]
        if all(parts):
            secs = sum(p["seconds"] for p in parts)  # type: ignore[index]
            summary["path"][label(n)] = {
                "events": parts[0]["events"],  # type: ignore[index]
                "seconds": round(secs, 2),
                "events_per_second": round(parts[0]["events"] / secs),  # type: ignore[index]
                "peak_rss_gb": max(p["peak_rss_gb"] for p in parts),  # type: ignore[index]
            }
    summary["storage"] = {}
    for n in sizes:
        delta, hive, again = (complete.get((n, s)) for s in ("ingest", "ingest-hive", "reingest"))
        if delta and hive:
            summary["storage"][label(n)] = {
                "delta_events_per_second": delta["events_per_second"],
                "hive_events_per_second": hive["events_per_second"],
                "delta_peak_rss_gb": delta["peak_rss_gb"], "hive_peak_rss_gb": hive["peak_rss_gb"],
                "delta_partitions": delta["detail"]["partitions"],
                "hive_partitions": hive["detail"]["partitions"],
                "reingest_seconds": again["seconds"] if again else None,
            }
    pandas_rows = [r for r in ran if r["stage"] == "pandas"]
    if pandas_rows:
        p = pandas_rows[0]
        ours = complete[(p["size"], "sessions")]
        summary["pandas"] = {"size": label(p["size"]), "pandas_seconds": p["seconds"],
                             "ours_seconds": ours["seconds"], "timed_out": p.get("timed_out", False),
                             "ratio": round(p["seconds"] / max(ours["seconds"], 1e-9), 2)}
    return summary


def print_report(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if console.width < 110:  # piped output defaults to 80 columns, too narrow for the table
        console = Console(width=110)
    table = Table(title="bench_ingest: data stages (each in its own process)")
    for col in ("events", "stage", "seconds", "CPU s", "events/s", "peak RSS GB", "wall s", "load"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for r in rows:
        if r.get("skipped"):
            est = f"est. {r['estimate_seconds']:.0f} s" if r.get("estimate_seconds") else "no time left"
            table.add_row(label(r["size"]), r["stage"], f"skipped ({est})", "", "", "", "", "")
            continue
        cut = r.get("timed_out")
        cpu = r.get("cpu_seconds")
        table.add_row(label(r["size"]), r["stage"] + (" (stopped)" if cut else ""),
                      f"{'>' if cut else ''}{r['seconds']:.2f}", "" if cpu is None else f"{cpu:.2f}",
                      f"{'<' if cut else ''}{r['events_per_second']:,}",
                      f"{r['peak_rss_gb']:.2f}", f"{r['wall_seconds']:.1f}",
                      f"{r['load_before']:.1f}->{r['load_after']:.1f}")
    console.print(table)
    for size, st in summary["ingest"].items():
        ok = st["target_met"]
        target = ("" if ok is None else f" [{'green' if ok else 'yellow'}](target {INGEST_TARGET_EPS:,}/s "
                  f"at 10M: {'met' if ok else 'not met'})[/]")
        console.print(f"ingest stage at {size}: {st['events_per_second']:,} events/s ({st['seconds']:.1f} s)"
                      f"{target}")
    for size, p in summary["path"].items():
        console.print(f"ingest->sessions->split at {size}: {p['events_per_second']:,} events/s "
                      f"({p['seconds']:.1f} s; information)")
    for size, rss in summary["peak_rss_gb"].items():
        ok = rss <= RSS_TARGET_GB
        console.print(f"peak RSS of any pipeline stage at {size}: {rss:.2f} GB "
                      f"[{'green' if ok else 'yellow'}](target <= {RSS_TARGET_GB:g} GB at 50M: "
                      f"{'met' if ok else 'not met'})[/]")
    for size, st in summary.get("storage", {}).items():
        again = st["reingest_seconds"]
        again = "" if again is None else f"; re-ingest (idempotent) {again:.1f} s"
        console.print(f"ingest at {size}: Delta table {st['delta_events_per_second']:,} events/s, peak "
                      f"{st['delta_peak_rss_gb']:.2f} GB vs previous hive layout "
                      f"{st['hive_events_per_second']:,} events/s, peak {st['hive_peak_rss_gb']:.2f} GB"
                      f"{again}")
    if "pandas" in summary:
        pd_ = summary["pandas"]
        more = "> " if pd_["timed_out"] else ""
        ok = pd_["ratio"] >= PANDAS_RATIO_TARGET
        colour = "green" if ok else "yellow"
        console.print(f"sessionise at {pd_['size']}: pandas {more}{pd_['pandas_seconds']:.1f} s vs ours "
                      f"{pd_['ours_seconds']:.1f} s -> [{colour}]{more}{pd_['ratio']:.1f}x[/] "
                      f"(target >= {PANDAS_RATIO_TARGET:g}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10M,50M", help="comma-separated event counts, e.g. 200k,10M,50M")
    ap.add_argument("--work", type=Path, default=REPO / "data" / "bench",
                    help="scratch data root (one sub-directory per size, removed afterwards)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "bench_ingest.json")
    ap.add_argument("--set", action="append",
                    help="config override for every stage, e.g. sessions.gap_minutes=120")
    ap.add_argument("--no-pandas", action="store_true", help="skip the pandas sessioniser comparison")
    ap.add_argument("--pandas-size", default=None, help="size for the pandas run (default: the first size)")
    ap.add_argument("--pandas-timeout", type=float, default=None,
                    help="kill the pandas run after this many seconds (default: 20x our sessions time, at "
                         "least 60 s); the ratio is then a lower bound")
    ap.add_argument("--deadline", default=None,
                    help="HH:MM (UTC): skip stages estimated to end later, cut off a stage still running")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile each pipeline stage into benchmarks/results/profile_<stage>_<size>.txt")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--baseline", default="40dabb0",
                    help="git ref whose ingest runs as ingest-hive (default: the last commit with the hive "
                         "Parquet layout); '' to skip")
    ap.add_argument("--no-reingest", action="store_true", help="skip the idempotent re-ingest stage")
    ap.add_argument("--_stage", dest="stage", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_profile-to", dest="profile_to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        child_main(args)
        return

    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    pandas_size = parse_size(args.pandas_size) if args.pandas_size else sizes[0]
    sets = args.set or []
    deadline = parse_deadline(args.deadline) if args.deadline else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with_pandas = not args.no_pandas and pandas_size in sizes

    baseline = extract_baseline(args.baseline, args.work / "baseline-src") if args.baseline else None

    def stage_run(stage: str, n: int) -> bool:
        """Run one stage unless it cannot finish before the deadline; False when skipped or cut off."""
        left = deadline - time.time() if deadline else None
        estimate = estimate_seconds(rows, stage, n)
        if left is not None and (left < 10 or (estimate is not None and estimate > left)):
            rows.append({"stage": stage, "size": n, "skipped": True, "estimate_seconds": estimate,
                         "seconds_left": round(left)})
            print(f"[{time.strftime('%H:%M:%S')}] {label(n)} {stage}: skipped (estimated "
                  f"{estimate or 0:.0f} s, {left:.0f} s left before the deadline)", flush=True)
            return False
        profiled = args.profile and stage != "pandas"
        prof = args.out.parent / f"profile_{stage}_{label(n)}.txt" if profiled else None
        print(f"[{time.strftime('%H:%M:%S')}] {label(n)} {stage} ...", flush=True)
        timeout = left
        if stage == "pandas":
            ours = next(r for r in rows if r["size"] == n and r["stage"] == "sessions")
            limit = args.pandas_timeout or max(60.0, PANDAS_STOP_RATIO * ours["seconds"])
            timeout = min(limit, left) if left is not None else limit
        pythonpath = baseline if stage == "ingest-hive" else None
        rows.append(run_child(stage, args.work / label(n), n, sets, prof, timeout, pythonpath))
        r = rows[-1]
        print(f"    {'>' if r.get('timed_out') else ''}{r['seconds']:.1f} s, {r['events_per_second']:,} "
              f"events/s, peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
        return not r.get("timed_out")

    try:
        for n in sizes:
            work = args.work / label(n)
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            for stage in STAGES:
                if not stage_run(stage, n):
                    break  # later stages need this one's output
            else:
                if baseline is not None:
                    stage_run("ingest-hive", n)
                if not args.no_reingest:
                    stage_run("reingest", n)
                if with_pandas and n == pandas_size:
                    stage_run("pandas", n)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep:
            for n in sizes:
                shutil.rmtree(args.work / label(n), ignore_errors=True)
    summary = summarise(rows, sizes)
    report = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
                    "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
        "overrides": sets,
        "baseline": args.baseline,
        "rows": rows,
        "summary": summary,
        "targets": {"ingest_events_per_second_at_10M": INGEST_TARGET_EPS, "peak_rss_gb_at_50M": RSS_TARGET_GB,
                    "pandas_ratio": PANDAS_RATIO_TARGET},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_report(rows, summary)
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
