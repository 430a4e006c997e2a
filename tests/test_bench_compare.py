"""bench/compare.py on small result files: which metrics it reads, when a change is beyond
the noise and when it fails the gate, which results of a commit it picks. No benchmark
runs here; one real process keeps a result the way the bench scripts do."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

MACHINE = {"cpu_model": "AMD EPYC", "nproc": 2, "git": "abc1234", "git_full": "abc1234" + "0" * 33,
           "dirty": [], "loadavg": 0.5,
           "pinning": {"pinned": True, "generator": 0, "server": 1, "redis": 1, "note": ""}}


def run(srv: float, redis: float = 50.0, achieved: float = 1000.0, p99: float = 2.0,
        errors: int = 0) -> dict:
    return {"srv_us_per_call": srv, "redis_us_per_call": redis, "achieved": achieved,
            "lat_med_ms": 0.8, "lat_p99_ms": p99, "errors": errors}


def agi(srvs, floors=None, machine=None, **kw) -> dict:
    result = {"bench": "agi_load", "target": "callguard", "rate": 1000.0, "duration": 20.0,
              "machine": machine or MACHINE, "runs": [run(s, **kw) for s in srvs]}
    if floors:
        result["floor"] = {"target": "minimal", "runs": [run(f, redis=2.0) for f in floors]}
    return result


def write_kept(path: Path, result: dict, started: str) -> Path:
    path.write_text(json.dumps({"script": "agi_load", "argv": [], "started": started,
                                "machine": result["machine"], "result": result}))
    return path


def test_the_metrics_of_a_run_with_its_floor_per_run():
    m = compare.metrics(agi([200, 210, 190], floors=[100, 100, 96]))
    assert m["serve us/setup"] == [200, 210, 190]
    assert m["redis us/setup"] == [50, 50, 50]
    assert m["floor serve us/setup"] == [100, 100, 96]
    # (serve + Redis) over the floor run beside it, as agi_load's vs_floor has it
    assert m["ratio to floor"] == pytest.approx([2.5, 2.6, 2.5])
    assert m["p99 ms"] == [2.0] * 3 and m["errors"] == [0] * 3


def test_redis_per_setup_from_an_older_result_without_the_field():
    old = {"bench": "agi_load", "target": "callguard",
           "runs": [{"srv_us_per_call": 300, "cpu_redis": 0.12, "achieved": 1000.0}]}
    assert compare.metrics(old)["redis us/setup"] == pytest.approx([120.0])


def test_whole_calls_are_per_call_and_find_max_reads_each_search():
    calls = compare.metrics({"bench": "calls", "runs": [run(1500)]})
    assert "serve us/call" in calls and "serve us/setup" not in calls
    found = compare.metrics({"bench": "agi_load", "target": "callguard", "find_max": {
        "searches": [{"best": 4000.0, "best_step": {"srv_us_per_call": 180.0}},
                     {"best": None, "best_step": None}]}})
    assert found["max rate /s"] == [4000.0, 0.0]
    assert found["serve us/setup at max"] == [180.0]


def test_a_change_within_the_spread_is_no_flag_whatever_its_size():
    row = compare.compare("serve us/setup", [200, 260, 210], [250, 300, 240], threshold=10)
    assert row["change"] == pytest.approx(19.05, abs=0.01)
    assert row["flag"] == "" and not row["regression"]


def test_more_cpu_beyond_both_spreads_and_the_threshold_is_a_regression():
    row = compare.compare("serve us/setup", [200, 205, 195], [230, 240, 226], threshold=10)
    assert row["flag"] == "worse" and row["regression"]
    under = compare.compare("serve us/setup", [200, 205, 195], [215, 218, 212], threshold=10)
    assert under["flag"] == "worse" and not under["regression"]  # +8 %: shown, not failed
    better = compare.compare("serve us/setup", [230, 240, 226], [200, 205, 195], threshold=10)
    assert better["flag"] == "better" and not better["regression"]


def test_a_lower_rate_is_worse_but_gates_nothing_only_cpu_does():
    row = compare.compare("achieved /s", [1000, 1000, 999], [800, 810, 790], threshold=10)
    assert row["flag"] == "worse" and not row["regression"]
    ratio = compare.compare("ratio to floor", [1.6, 1.7, 1.65], [2.0, 2.1, 2.05], threshold=10)
    assert ratio["regression"]


def test_the_newest_result_of_a_commit_per_bench_and_target(tmp_path):
    other = {**MACHINE, "git": "def5678", "git_full": "def5678" + "1" * 33}
    files = [write_kept(tmp_path / "a.json", agi([200]), "20261202T100000Z"),
             write_kept(tmp_path / "b.json", agi([100]), "20261201T100000Z"),
             write_kept(tmp_path / "c.json", agi([300], machine=other), "20261203T100000Z"),
             write_kept(tmp_path / "d.json", {**agi([400]), "target": "minimal"},
                        "20261130T100000Z")]
    entries = [e for f in files for e in compare.load(f)]
    picked = compare.newest(compare.of_commit(MACHINE["git_full"], entries))
    assert sorted(picked) == ["agi_load callguard", "agi_load minimal"]
    assert picked["agi_load callguard"]["source"].endswith("a.json")  # by time, not file
    # results.jsonl lines know only the short sha
    line = {"file": "01-callguard-1000.out", "result": agi([500], machine={"git": "abc1234"})}
    (tmp_path / "r.jsonl").write_text(json.dumps(line) + "\n")
    published = compare.load(tmp_path / "r.jsonl", "01-callguard-1000.out")
    assert compare.of_commit(MACHINE["git_full"], published) == published
    assert compare.load(tmp_path / "r.jsonl", "another label") == []


def test_warns_of_another_machine_and_other_pinning():
    other = {**MACHINE, "nproc": 4, "pinning": {"pinned": False}}
    said = compare.warnings(compare.entry(agi([1]), "a"), compare.entry(agi([1], machine=other),
                                                                        "b"))
    assert any("CPU count 2 vs 4" in w for w in said)
    assert any("pinned differently" in w for w in said)
    assert compare.warnings(compare.entry(agi([1]), "a"), compare.entry(agi([2]), "b")) == []


def test_the_exit_status_gates_on_a_cpu_regression(tmp_path, capsys):
    old = write_kept(tmp_path / "old.json", agi([200, 205, 195], floors=[100] * 3), "1")
    worse = write_kept(tmp_path / "new.json", agi([260, 270, 255], floors=[100] * 3), "2")
    same = write_kept(tmp_path / "same.json", agi([199, 206, 201], floors=[100] * 3), "3")
    assert compare.main([str(old), str(worse)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert compare.main([str(old), str(same)]) == 0
    assert compare.main([str(old), str(worse), "--threshold", "40%"]) == 0
    minimal = write_kept(tmp_path / "m.json", {**agi([1]), "target": "minimal"}, "4")
    assert compare.main([str(old), str(minimal)]) == 2


def test_a_kept_result_is_found_by_its_commit(tmp_path):
    """common.keep_results and emit_json in a real process, as a bench script calls them:
    the .json and .out are named after the commit, and compare finds them by it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import argparse, common\n"
            "p = argparse.ArgumentParser(); common.add_results_args(p)\n"
            "args = p.parse_args(sys.argv[2:]); common.keep_results(args, 'agi_load')\n"
            "print('a line of output')\n"
            "common.emit_json({'bench': 'agi_load', 'target': 'callguard', 'runs': "
            "[{'srv_us_per_call': 150.0, 'achieved': 999.0}]})\n")
    subprocess.run([sys.executable, "-c", code, str(BENCH), "--results-dir", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    [kept] = tmp_path.glob("*.json")
    record = json.loads(kept.read_text())
    head = compare.rev_parse("HEAD")
    assert kept.name.startswith("20") and f"-{head[:7]}" in kept.name
    assert kept.name.endswith("-agi_load.json")
    assert record["machine"]["git_full"] == head and "cpu_model" in record["machine"]
    out = kept.with_suffix(".out").read_text()
    assert "a line of output" in out and "RESULT {" in out
    picked = compare.select("HEAD", tmp_path, tmp_path / "none.jsonl")
    assert picked["agi_load callguard"]["result"]["runs"][0]["srv_us_per_call"] == 150.0
