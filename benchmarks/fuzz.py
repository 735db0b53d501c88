"""The long fuzz run: thousands of mutated configs through ``esegeta validate`` (or ``check``,
``run``), counted.

Every answer must be exit 0 or exit 2 naming a JSON path (``check`` and ``run`` may also exit 1),
within ``--limit-s`` seconds a case (see ``tests/fuzz_cases.py``, shared with
``tests/test_fuzz.py``; its cases include bad files, factories that exit or print, datasets that
break, hostile input names and Ray addresses with no cluster). Prints the counts (exit 0, exit 1,
exit 2, other, timeout) and, for "other" and "timeout", each distinct site with one example; writes
them as JSON with ``--json FILE``; ``--save DIR`` keeps every such case's whole config there
(``case-N-KIND.json``, to rerun alone: ``esegeta run DIR/case-N-timeout.json``; a case past half
the limit as ``case-N-slow-Ss.json``), and the slowest cases are listed with their seconds (a slow
case that ends is not a hang: a timeout is run again alone with ``--retry-factor`` (3) times the
limit, and counted as ended or as a hang). ``--seed`` makes the cases the same from one run to the next
(Hypothesis's ``seed``).

    OMP_NUM_THREADS=1 python benchmarks/fuzz.py --cases 10000 --json fuzz.json
    OMP_NUM_THREADS=1 python benchmarks/fuzz.py --command run --cases 500 --limit-s 120
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from fuzz_cases import cases, run_case, samples  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the counts and sites here")
    parser.add_argument("--command", choices=["validate", "check", "run"], default="validate")
    parser.add_argument("--limit-s", type=float, default=60.0, help="time limit of one case (a timeout past it)")
    parser.add_argument("--save", type=Path, help="keep the whole config of every traceback or timeout case here")
    parser.add_argument("--retry-factor", type=float, default=3.0,
                        help="a timeout is run again alone with this many times the limit: an answer then is a slow "
                             "case, another timeout a hang (0: no retry)")
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()
    sites: dict[str, dict] = {}
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="esegeta-fuzz-"))

    strategy = cases(samples())

    slowest: list[tuple[float, int, str, str]] = []  # (seconds, case, kind, config head)
    retried: list[dict] = []  # timeouts run again alone with --retry-factor times the limit

    def one(content: bytes) -> None:
        began = time.perf_counter()
        answer = run_case(content, folder, args.command, args.limit_s)
        seconds = time.perf_counter() - began
        counts[answer.kind] += 1
        n = sum(counts.values())
        slowest.append((seconds, n, answer.kind, content[:300].decode("utf-8", "replace")))
        slowest.sort(key=lambda s: -s[0])
        del slowest[5:]
        if args.save and seconds > args.limit_s / 2:  # slow: kept whole, to time it alone
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"case-{n}-slow-{seconds:.0f}s.json").write_bytes(content)
        if answer.kind in ("other", "timeout") and args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"case-{n}-{answer.kind}.json").write_bytes(content)
        if answer.kind == "timeout" and args.retry_factor > 0:  # slow, or a hang? once more, alone, longer
            began = time.perf_counter()
            again = run_case(content, folder, args.command, args.limit_s * args.retry_factor)
            retried.append({"case": n, "kind": again.kind, "seconds": round(time.perf_counter() - began, 1)})
            counts["timeout, then ended" if again.kind != "timeout" else "timeout, again"] += 1
        if answer.kind in ("other", "timeout"):
            site = answer.site or answer.error[:120]
            entry = sites.setdefault(site, {"count": 0, "error": answer.error, "example": content[:400].decode(
                "utf-8", "replace")})
            entry["count"] += 1
        if n % (500 if args.command == "validate" else 25) == 0:
            print(f"{n} cases, {time.perf_counter() - start:.0f} s: {dict(counts)}", file=sys.stderr, flush=True)

    import random

    random.seed(args.seed)
    for _ in range(5):  # hypothesis stops at an error of its own; the count goes on from there
        done = sum(counts.values())
        if done >= args.cases:
            break
        try:
            settings(max_examples=args.cases - done, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))(seed(args.seed + done)(given(strategy)(one)))()
        except Exception as exc:  # noqa: BLE001
            print(f"hypothesis stopped after {sum(counts.values())} cases: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}", file=sys.stderr)
    total = sum(counts.values())
    result = {"command": args.command, "cases": total, **{k: counts[k] for k in ("exit 0", "exit 1", "exit 2", "other",
                                                                                 "timeout")},
              "timeouts that ended alone": counts["timeout, then ended"], "timeouts again (hangs)": counts["timeout, again"],
              "retried": retried,
              "seconds": round(time.perf_counter() - start, 1), "sites": sites,
              "slowest": [{"seconds": round(t, 1), "case": n, "kind": kind, "head": head}
                          for t, n, kind, head in slowest]}
    print(json.dumps({k: v for k, v in result.items() if k not in ("sites", "slowest", "retried")}))
    for entry in retried:
        print(f"  timeout retried: case {entry['case']} {entry['kind']} in {entry['seconds']} s "
              f"(limit x {args.retry_factor:g})")
    for entry in result["slowest"]:
        print(f"  slow: case {entry['case']} {entry['kind']} in {entry['seconds']} s: {entry['head'][:160]!r}")
    for site, entry in sorted(sites.items(), key=lambda kv: -kv[1]["count"]):
        print(f"  {entry['count']:5d}  {site}: {entry['error'][:200]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if counts["other"] == counts["timeout, again"] == 0 and (counts["timeout"] == 0 or args.retry_factor) else 1


if __name__ == "__main__":
    sys.exit(main())
