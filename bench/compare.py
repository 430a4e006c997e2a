"""Compare two benchmark results: what changed from OLD to NEW, and whether it is noise.

    .venv/bin/python bench/compare.py OLD NEW [--threshold 10%]
    .venv/bin/python bench/compare.py main HEAD          # the newest results of two commits
    .venv/bin/python bench/compare.py bench/results/A.json bench/results/B.json
    .venv/bin/python bench/compare.py 'bench/results.jsonl#01-callguard-1000.out' HEAD

OLD and NEW are each a result file a bench script kept (bench/results/*.json), a
directory of them, bench/results.jsonl (FILE.jsonl#LABEL for one of its lines, by its
"file"), or a git commit (anything `git rev-parse` takes): then the newest result of that
commit in --results-dir and bench/results.jsonl, per script. Results pair by bench and
target (agi_load callguard with agi_load callguard, agi_load --find-max with its like).

Per metric: OLD median [min-max] over its runs, NEW median [min-max], the change of the
median in %, and a flag when the change lies beyond the spread of both (NEW's whole range
above or below OLD's): a change to look at. Exit status 1 when a CPU-per-call metric
(serve or Redis CPU per setup or call, the ratio to the floor) got worse beyond both
spreads and by more than --threshold, so a change can be gated on it; 2 when there is
nothing to compare. Warns when the two ran on different machines (CPU model, CPU count)
or pinned differently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS_DIR = BENCH / "results"
JSONL = BENCH / "results.jsonl"
SETUP_BENCHES = ("agi_load", "esl_load")  # a "call" there is one setup
HIGHER_IS_BETTER = ("achieved /s", "max rate /s", "floor max rate /s", "max rate / floor's")


# -- reading results --------------------------------------------------------------------------

def entry(result: dict, source: str, machine: dict | None = None, started: str | None = None,
          order: int = 0) -> dict:
    """One result as compare reads it, whatever file it came from."""
    return {"result": result, "source": source, "started": started or "", "order": order,
            "machine": machine or result.get("machine") or {}}


def load(path: Path, label: str | None = None) -> list[dict]:
    """The results in a kept .json file, or the lines of a .jsonl (one, with `label`)."""
    if path.suffix == ".jsonl":
        found = []
        for n, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            record = json.loads(line)
            result, name = record.get("result", record), record.get("file") or f"line {n + 1}"
            if label is None or name == label:
                found.append(entry(result, f"{path.name}#{name}", order=n))
        return found
    record = json.loads(path.read_text())
    if "result" in record and "script" in record:  # kept by common.keep_results
        return [entry(record["result"], str(path), record.get("machine"),
                      record.get("started"))]
    return [entry(record, str(path))]


def key(result: dict) -> str:
    """What a result is a measurement of: results with the same key compare."""
    parts = [result.get("bench") or "?"]
    for name in ("target", "pbx", "lua", "client"):
        if result.get(name):
            parts.append(str(result[name]))
    if "find_max" in result:
        parts.append("find-max")
    return " ".join(parts)


def newest(entries: list[dict]) -> dict[str, dict]:
    """The newest entry of each key (kept files by their start time, then file order)."""
    out: dict[str, dict] = {}
    for e in sorted(entries, key=lambda e: (e["started"], e["order"])):
        out[key(e["result"])] = e
    return out


def of_commit(full_sha: str, entries: list[dict]) -> list[dict]:
    """The entries taken at that commit (older files know only the short sha)."""
    def matches(machine: dict) -> bool:
        if machine.get("git_full"):
            return machine["git_full"] == full_sha
        return bool(machine.get("git")) and full_sha.startswith(machine["git"])

    return [e for e in entries if matches(e["machine"])]


def rev_parse(rev: str) -> str | None:
    out = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "--verify", "--quiet",
                          f"{rev}^{{commit}}"], capture_output=True, text=True)
    return out.stdout.strip() or None


def select(arg: str, results_dir: Path, jsonl: Path) -> dict[str, dict]:
    """OLD or NEW on the command line, as {key: newest entry}."""
    path, _, label = arg.partition("#")
    p = Path(path)
    if p.is_file():
        return newest(load(p, label or None))
    if p.is_dir():
        return newest([e for f in sorted(p.glob("*.json")) for e in load(f)])
    sha = rev_parse(arg)
    if sha is None:
        raise SystemExit(f"compare: {arg} is no result file, directory or commit")
    kept = [e for f in sorted(results_dir.glob("*.json")) for e in load(f)] \
        if results_dir.is_dir() else []
    published = load(jsonl) if jsonl.is_file() else []
    return newest(of_commit(sha, published + kept))


# -- metrics ------------------------------------------------------------------------------------

def metrics(result: dict) -> dict[str, list[float]]:
    """Per-run values of each metric compare knows, from one result."""
    unit = "setup" if result.get("bench") in SETUP_BENCHES else "call"
    out: dict[str, list[float]] = {}

    def put(name: str, values) -> None:
        values = [float(v) for v in values if v is not None and v == v]
        if values:
            out[name] = values

    runs = result.get("runs")
    if isinstance(runs, list) and runs and isinstance(runs[0], dict) and "achieved" in runs[0]:
        floor_runs = (result.get("floor") or {}).get("runs") or []
        put(f"serve us/{unit}", [r.get("srv_us_per_call") for r in runs])
        put(f"redis us/{unit}", [redis_us(r) for r in runs])
        put(f"floor serve us/{unit}", [r.get("srv_us_per_call") for r in floor_runs])
        ratios = (result.get("vs_floor") or {}).get("ratios")
        if ratios is None and floor_runs:
            ratios = [(r["srv_us_per_call"] + (redis_us(r) or 0.0)) / f["srv_us_per_call"]
                      for r, f in zip(runs, floor_runs, strict=False)
                      if r.get("srv_us_per_call") and f.get("srv_us_per_call")]
        put("ratio to floor", ratios or [])
        put("achieved /s", [r.get("achieved") for r in runs])
        put("p50 ms", [r.get("lat_med_ms") for r in runs])
        put("p99 ms", [r.get("lat_p99_ms") for r in runs])
        put("errors", [r.get("errors") for r in runs])
    searches = (result.get("find_max") or {}).get("searches")
    if searches:
        put("max rate /s", [s.get("best") or 0.0 for s in searches])
        put(f"serve us/{unit} at max", [(s.get("best_step") or {}).get("srv_us_per_call")
                                        for s in searches])
        floor = ((result.get("floor") or {}).get("find_max") or {}).get("searches") or []
        put("floor max rate /s", [s.get("best") or 0.0 for s in floor])
        put("max rate / floor's", (result.get("vs_floor") or {}).get("max_ratios") or [])
    return out


def redis_us(run: dict) -> float | None:
    if run.get("redis_us_per_call") is not None:
        return run["redis_us_per_call"]
    if run.get("cpu_redis") is not None and run.get("achieved"):
        return run["cpu_redis"] / run["achieved"] * 1e6
    return None


def is_cpu(name: str) -> bool:
    """The metrics a change is gated on: callguard's own CPU per setup or call."""
    return name.startswith(("serve us/", "redis us/")) or name == "ratio to floor"


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(name: str, old: list[float], new: list[float], threshold: float) -> dict:
    """One metric's row: both spreads, the change of the medians in %, whether NEW lies
    beyond both spreads (and which way is worse), and whether that fails the gate."""
    o, n = spread(old), spread(new)
    if o["median"]:
        change = (n["median"] - o["median"]) / abs(o["median"]) * 100
    else:
        change = 0.0 if n["median"] == o["median"] else float("inf")
    beyond = n["min"] > o["max"] or n["max"] < o["min"]
    higher = n["median"] > o["median"]
    worse = higher != (name in HIGHER_IS_BETTER)
    flag = ("worse" if worse else "better") if beyond else ""
    return {"metric": name, "old": o, "new": n, "change": change, "flag": flag,
            "regression": bool(flag == "worse" and is_cpu(name) and abs(change) > threshold)}


def compare_results(old: dict, new: dict, threshold: float) -> list[dict]:
    a, b = metrics(old), metrics(new)
    return [compare(name, a[name], b[name], threshold) for name in a if name in b]


# -- the two runs' conditions -------------------------------------------------------------------

def warnings(old: dict, new: dict) -> list[str]:
    """Why the two may not compare: machine, pinning, load, local changes, parameters."""
    om, nm = old["machine"], new["machine"]
    out = []
    for field, what in (("cpu_model", "CPU model"), ("nproc", "CPU count")):
        if om.get(field) != nm.get(field):
            out.append(f"different machines: {what} {om.get(field)!r} vs {nm.get(field)!r}")
    op, np_ = pin_summary(om), pin_summary(nm)
    if op != np_:
        out.append(f"pinned differently: OLD {op}, NEW {np_}")
    unpinned = []
    for side, e in (("OLD", old), ("NEW", new)):
        dirty = e["machine"].get("dirty") or []
        if dirty:
            more = f" and {len(dirty) - 3} more" if len(dirty) > 3 else ""
            out.append(f"{side} ran with local changes in {', '.join(dirty[:3])}{more}")
        pin = e["machine"].get("pinning") or {}
        if pin.get("pinned") and pin.get("redis") is None:
            unpinned.append(side)
    if unpinned:
        out.append(f"Redis not pinned in {' and '.join(unpinned)} (the shared one?): its CPU "
                   "includes its other clients'")
    for field in ("rate", "duration", "accounts"):
        if old["result"].get(field) != new["result"].get(field):
            out.append(f"different {field}: {old['result'].get(field)} vs "
                       f"{new['result'].get(field)}")
    if len(old["result"].get("runs") or []) != len(new["result"].get("runs") or []):
        out.append("different numbers of runs")
    return out


def pin_summary(machine: dict) -> str:
    pin = machine.get("pinning")
    if pin is None:
        return "not recorded"
    if not pin.get("pinned"):
        return "not pinned"
    redis = "unpinned" if pin.get("redis") is None else f"CPU {pin['redis']}"
    return f"generator CPU {pin.get('generator')}, server CPU {pin.get('server')}, Redis {redis}"


# -- output -------------------------------------------------------------------------------------

def num(value: float) -> str:
    if value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def describe(e: dict) -> str:
    m = e["machine"]
    when = e["started"] or "time not recorded"
    load = m.get("loadavg")
    return (f"{e['source']} (commit {m.get('git') or '?'}{' dirty' if m.get('dirty') else ''}, "
            f"{when}, load {num(load) if load is not None else '?'}, {pin_summary(m)})")


def print_rows(rows: list[dict], threshold: float) -> None:
    cells = [["metric", "OLD median [min-max]", "NEW median [min-max]", "change", ""]]
    for r in rows:
        o, n = r["old"], r["new"]
        note = {"worse": "WORSE beyond both spreads", "better": "better beyond both spreads",
                "": ""}[r["flag"]]
        if r["regression"]:
            note += f", over {threshold:g}%: REGRESSION"
        cells.append([r["metric"], f"{num(o['median'])} [{num(o['min'])}-{num(o['max'])}]",
                      f"{num(n['median'])} [{num(n['min'])}-{num(n['max'])}]",
                      f"{r['change']:+.1f}%", note])
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    for row in cells:
        print("  " + "  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True)))
              .rstrip())


def parse_threshold(text: str) -> float:
    """'10%' or '10': percent."""
    return float(text.strip().rstrip("%"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", metavar="OLD")
    parser.add_argument("new", metavar="NEW")
    parser.add_argument("--threshold", type=parse_threshold, default=10.0, metavar="PCT",
                        help="fail when a CPU-per-call metric got worse by more than this, "
                             "beyond both spreads (default 10%%)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, metavar="DIR",
                        help="where to look for a commit's results (bench/results/)")
    parser.add_argument("--jsonl", type=Path, default=JSONL, metavar="FILE",
                        help="published results also searched for a commit's "
                             "(bench/results.jsonl)")
    args = parser.parse_args(argv)
    old = select(args.old, args.results_dir, args.jsonl)
    new = select(args.new, args.results_dir, args.jsonl)
    common = [k for k in old if k in new]
    for side, found, other in (("OLD", old, new), ("NEW", new, old)):
        alone = [k for k in found if k not in other]
        if alone:
            print(f"# only in {side}: {', '.join(alone)}")
    if not common:
        print(f"compare: nothing to compare ({len(old)} result(s) for OLD, {len(new)} for "
              "NEW, no bench and target in both)", file=sys.stderr)
        return 2
    failed = []
    for k in common:
        print(f"\n{k}\n  OLD {describe(old[k])}\n  NEW {describe(new[k])}")
        for warning in warnings(old[k], new[k]):
            print(f"  warning: {warning}")
        rows = compare_results(old[k]["result"], new[k]["result"], args.threshold)
        if not rows:
            print("  no metric compare knows is in both")
            continue
        print_rows(rows, args.threshold)
        failed += [f"{k}: {r['metric']} {r['change']:+.1f}%" for r in rows if r["regression"]]
    if failed:
        print(f"\nREGRESSION (CPU per call worse by more than {args.threshold:g}% beyond the "
              f"noise): {'; '.join(failed)}")
        return 1
    print(f"\nno CPU-per-call metric worse by more than {args.threshold:g}% beyond the noise")
    return 0


if __name__ == "__main__":
    sys.exit(main())
