"""Coverage-guided fuzzing of the AGI, AMI and ESL parsers with atheris (libFuzzer).

    pip install -e '.[fuzz]'            # atheris, pinned in constraints.txt
    taskset -c 1 python bench/fuzz.py all --seconds 600

For each parser: seeds cut from the transcripts in tests/fixtures/ plus the corpus kept in
tests/fixtures/fuzz/<parser>/, then atheris for --seconds on the targets of
tests/fuzz_targets.py with callguard.protocol instrumented, then libFuzzer's merge of
everything found into a minimal corpus, of which the inputs that reach the most features
(greedy, at most --keep-files) replace tests/fixtures/fuzz/<parser>/; a crash input is kept
there as crash-<sha1> (timeout-, oom-) whatever it covers. tests/test_fuzz_corpus.py replays
that directory.

A crash stops that parser's run: the input is in WORK/crashes/, the traceback in
WORK/<parser>.log. Prints executions, coverage and features per parser, and a RESULT line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

ROOT = common.ROOT
TESTS = ROOT / "tests"
KEPT = TESTS / "fixtures" / "fuzz"
PARSERS = ("agi", "ami", "esl")
SEED_BYTES = 2048  # transcripts are cut into seeds of whole messages up to this size
MAX_LEN = {"agi": 4096, "ami": 4096, "esl": 12288}  # the biggest recorded frame is 9.7 KB
KEEP_BYTES = 128 << 10  # kept in tests/fixtures/fuzz/ per parser, at most


# --- seeds from the transcripts ------------------------------------------------------------

def seeds(parser: str) -> list[bytes]:
    """Fuzz inputs of the recorded streams: whole, byte by byte, in odd chunks, tight."""
    sys.path.insert(0, str(TESTS))
    import fs_transcripts
    import transcripts

    if parser == "agi":  # one session each, a few KB at most
        streams = [transcripts.stream(name, transcripts.FROM)
                   for name in transcripts.names("agi")]
    elif parser == "ami":  # the banner, then messages
        streams = []
        for name in transcripts.names("ami"):
            data = transcripts.stream(name, transcripts.FROM)
            banner, _, rest = data.partition(b"\r\n")
            messages = [m + b"\r\n\r\n" for m in rest.split(b"\r\n\r\n")[:-1]]
            streams += [banner + b"\r\n" + window for window in _windows(messages)]
    else:  # frames, either kind of connection
        streams = [window for name, conn in fs_transcripts.streams()
                   for window in _windows(fs_transcripts.raw_frames(
                       fs_transcripts.stream(name, conn, fs_transcripts.FROM)))]
    # whole; byte by byte; tight bounds in chunks of 7, 1, 65; ESL's outbound reader in 17, 3
    headers = [b"\x00", b"\x01\x00", b"\x0b\x06\x00\x40", b"\x12\x10\x02"]
    return list(dict.fromkeys(h + s for s in streams for h in headers))


def _windows(messages: list[bytes]) -> list[bytes]:
    """Consecutive messages packed into windows of at most SEED_BYTES (a bigger one alone)."""
    out, window = [], b""
    for message in messages:
        if window and len(window) + len(message) > SEED_BYTES:
            out.append(window)
            window = b""
        window += message
    return [*out, window] if window else out


# --- the atheris process ---------------------------------------------------------------------

def run_target(parser: str, argv0: str, libfuzzer_args: list[str]) -> None:
    """In the child: instrument the parsers, then hand over to libFuzzer (does not return)."""
    import atheris

    atheris.enabled_hooks.add("RegEx")  # steers inputs towards what the parsers' regexes match
    atheris.enabled_hooks.add("str")  # and what startswith/endswith compare against
    with atheris.instrument_imports(include=["callguard.protocol"]):
        import callguard.protocol.agi  # noqa: F401
        import callguard.protocol.ami  # noqa: F401
        import callguard.protocol.esl  # noqa: F401
    sys.path.insert(0, str(TESTS))
    import fuzz_targets

    atheris.instrument_func(fuzz_targets.stamp_ms)  # the adapters' pure readers of values
    atheris.instrument_func(fuzz_targets.micros_ms)
    # libFuzzer's merge runs argv[0] again with its own flags: the wrapper that names parser.
    atheris.Setup([argv0, *libfuzzer_args], fuzz_targets.TARGETS[parser])
    atheris.Fuzz()


def child(parser: str, args: list[str], log: Path, cpu: int | None) -> int:
    """Run the atheris child, its output appended to log; its exit code."""
    wrapper = log.parent / f"fuzz-{parser}"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} '
                       f'{shlex.quote(str(Path(__file__).resolve()))} '
                       f'--target {parser} "$0" -- "$@"\n')
    wrapper.chmod(0o755)
    cmd = [str(wrapper), *args]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode


STATUS = re.compile(r"^#(\d+)\s+(\w+)\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", re.M)
STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)


def fuzz_one(parser: str, seconds: int, work: Path, keep_files: int, cpu: int | None,
             update: bool) -> dict:
    corpus, seed_dir, crashes = (work / d / parser for d in ("corpus", "seeds", "crashes"))
    for d in (corpus, seed_dir, crashes, KEPT / parser):
        d.mkdir(parents=True, exist_ok=True)
    for data in seeds(parser):
        (seed_dir / hashlib.sha1(data).hexdigest()).write_bytes(data)
    log = work / f"{parser}.log"
    dirs = [str(corpus), str(seed_dir), str(KEPT / parser)]
    started = time.monotonic()
    code = 0
    if seconds:  # 0: only merge what WORK holds from an earlier run
        log.write_text("")
        code = child(parser, [f"-max_total_time={seconds}", f"-max_len={MAX_LEN[parser]}",
                              "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
                              f"-artifact_prefix={crashes}/", *dirs], log, cpu)
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace") if seconds else ""
    stats = {k: int(v) for k, v in STAT.findall(text)}
    status = STATUS.findall(text)
    last = status[-1] if status else ("0", "", "0", "0", "0", "0")
    found = sorted(p.name for p in crashes.iterdir())
    result = {
        "parser": parser, "seconds": seconds, "elapsed_s": round(elapsed, 1),
        "executions": stats.get("number_of_executed_units", int(last[0])),
        "exec_per_s": stats.get("average_exec_per_sec"), "new_units": stats.get("new_units_added"),
        "peak_rss_mb": stats.get("peak_rss_mb"), "coverage": int(last[2]),
        "features": int(last[3]), "corpus_files": int(last[4]), "seeds": len(os.listdir(seed_dir)),
        "exit": code, "crashes": found, "cpu": cpu,
    }
    if found:
        tail = text[text.rfind("=== Uncaught Python exception") :][:3000]
        print(f"{parser}: CRASH, input {crashes / found[0]}\n{tail}")
    if update:
        result["kept"] = keep_corpus(parser, work, dirs, keep_files, cpu)
    return result


def keep_corpus(parser: str, work: Path, dirs: list[str], keep_files: int,
                cpu: int | None) -> dict:
    """Merge everything into a minimal corpus, keep its best keep_files inputs (KEEP_BYTES
    at most) in KEPT."""
    merged, control = work / "merged" / parser, work / f"{parser}.merge"
    shutil.rmtree(merged, ignore_errors=True)  # a merge from scratch, not resumed
    control.unlink(missing_ok=True)
    merged.mkdir(parents=True)
    child(parser, ["-merge=1", f"-merge_control_file={control}",
                   f"-max_len={MAX_LEN[parser]}", "-timeout=10", "-rss_limit_mb=2048",
                   str(merged), *dirs], work / f"{parser}.merge.log", cpu)
    features = merge_features(control)
    chosen, covered, size = [], set(), 0
    while len(chosen) < keep_files:  # greedy: the input that adds the most features next
        best = max(features, key=lambda f: (len(features[f] - covered), -f.stat().st_size),
                   default=None)
        if best is None or not features[best] - covered:
            break
        if size + best.stat().st_size <= KEEP_BYTES:
            chosen.append(best)
            covered |= features[best]
            size += best.stat().st_size
        del features[best]
    target = KEPT / parser
    for p in (work / "crashes" / parser).iterdir():  # libFuzzer's crash-<sha1>, timeout-...
        shutil.copyfile(p, target / p.name)
    kept_crashes = {p.name for p in target.iterdir() if "-" in p.name}
    contents = {hashlib.sha1(p.read_bytes()).hexdigest(): p.read_bytes() for p in chosen}
    for p in target.iterdir():
        if p.name not in kept_crashes and p.name not in contents:
            p.unlink()
    for name, data in contents.items():
        (target / name).write_bytes(data)
    return {"files": len(contents), "bytes": sum(map(len, contents.values())),
            "features": len(covered), "crash_files": len(kept_crashes)}


def merge_features(control: Path) -> dict[Path, set[int]]:
    """Per input, the features libFuzzer's merge saw it reach (its control file's FT lines)."""
    lines = control.read_text().split("\n")
    count = int(lines[0])
    files = [Path(line) for line in lines[2 : 2 + count]]
    out: dict[Path, set[int]] = {}
    for line in lines[2 + count :]:
        if line.startswith("FT "):
            index, *feats = line.split()[1:]
            out[files[int(index)]] = set(map(int, feats))
    return out


def main() -> None:
    if "--target" in sys.argv:  # the atheris child
        i = sys.argv.index("--target")
        run_target(sys.argv[i + 1], sys.argv[i + 2], sys.argv[i + 4 :])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parser", choices=[*PARSERS, "all"])
    ap.add_argument("--seconds", type=int, default=300,
                    help="fuzzing time per parser; 0: only merge the corpus in --work again")
    ap.add_argument("--work", metavar="DIR", help="working directory (default: a temp dir, "
                    "removed at the end unless a crash was found)")
    ap.add_argument("--keep-files", type=int, default=100,
                    help="inputs kept per parser in tests/fixtures/fuzz/ (default 100)")
    ap.add_argument("--no-update", action="store_true",
                    help="leave tests/fixtures/fuzz/ alone (no merge)")
    ap.add_argument("--cpu", type=int, help="pin the fuzzer to this CPU (taskset)")
    ap.add_argument("--json-out", metavar="FILE", help="also append the RESULT line to FILE")
    common.add_results_args(ap)
    args = ap.parse_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        sys.exit("atheris is not installed: pip install -e '.[fuzz]' (see bench/README.md)")
    work = Path(args.work or tempfile.mkdtemp(prefix="callguard-fuzz-"))
    common.keep_results(args)
    info = common.print_machine()
    results = []
    for parser in PARSERS if args.parser == "all" else (args.parser,):
        r = fuzz_one(parser, args.seconds, work, args.keep_files, args.cpu, not args.no_update)
        results.append(r)
        print(f"{parser}: {r['executions']:,} executions in {r['elapsed_s']} s "
              f"({r['exec_per_s']}/s), cov {r['coverage']}, ft {r['features']}, "
              f"corpus {r['corpus_files']}, crashes {len(r['crashes'])}"
              + (f", kept {r['kept']}" if "kept" in r else ""))
    common.emit_json({"bench": "fuzz", "machine": info, "parsers": results,
                      "work": str(work)}, args.json_out)
    if any(r["crashes"] for r in results):
        print(f"crash inputs kept in {work}/crashes")
        sys.exit(1)
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
