"""This server against a peer from runs made one server at a time: the files `serve_bench.py --save` wrote.

    python benchmarks/peer_ratio.py this-1.json this-2.json --peer peer-1.json peer-2.json

`benchmarks/peer_bench.sh` makes such runs (each server started alone, the two alternated so that the
host's drift lands on both) and calls this. The k-th run of a level on this server is paired with the
k-th run of that level on the peer; the table gives each pair's output tokens/s, ratio, TTFT p50 and
TPOT p50, then each level's median ratio with its range. Every file must hold the same load (API, max
tokens, prompt padding, shared header) measured on the same CPU kind; the CPU kind and both servers'
settings are printed before the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def load(paths: list[str], side: str) -> list[dict]:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for path, run in zip(paths, runs, strict=True):
        if run.get("side") != side:
            raise SystemExit(f"{path} was saved as the {run.get('side')!r} side, not {side!r}")
    return runs


def check_same(runs: list[dict], key: str) -> str:
    values = {json.dumps(run[key], sort_keys=True) for run in runs}
    if len(values) > 1:
        raise SystemExit(f"the runs differ in {key}: {sorted(values)}")
    return runs[0][key]


def pairs(this: list[dict], peer: list[dict]) -> list[tuple[dict, dict]]:
    """(this level, peer level) for every level both sides ran, in order of the runs."""
    theirs: dict[float, list[dict]] = {}
    for level in (lv for run in peer for lv in run["levels"]):
        theirs.setdefault(level["concurrency"], []).append(level)
    waiting = {c: iter(levels) for c, levels in theirs.items()}  # the k-th peer run of each level, in turn
    paired = []
    for level in (lv for run in this for lv in run["levels"]):
        if (match := next(waiting.get(level["concurrency"], iter(())), None)) is not None:
            paired.append((level, match))
    return paired


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("this", nargs="+", help="this server's runs (serve_bench.py --save)")
    parser.add_argument("--peer", nargs="+", required=True, help="the peer's runs (--save --as-peer)")
    args = parser.parse_args()
    this, peer = load(args.this, "this"), load(args.peer, "peer")
    cpu = check_same(this + peer, "cpu")
    load_ = check_same(this + peer, "load")
    print(f"CPU: {cpu}")
    for name, runs in (("this server", this), ("peer", peer)):
        for server in dict.fromkeys(run["server"] for run in runs):
            print(f"{name}: {server}")
    print(f"load: {', '.join(f'{k} {v}' for k, v in load_.items())}")
    print("runs, one server at a time: " + "; ".join(f"{r['side']} {r['finished']}" for r in this + peer))
    print("\n| load | out tok/s this / peer | ratio | TTFT p50 ms this / peer | TPOT p50 ms this / peer |")
    print("|---|---|---|---|---|")
    by_level: dict[float, list[float]] = {}
    for a, b in pairs(this, peer):
        ratio = a["tok_s"] / b["tok_s"] if b["tok_s"] else float("nan")
        by_level.setdefault(a["concurrency"], []).append(ratio)
        failed = "" if a["ok"] == a["requests"] and b["ok"] == b["requests"] else " (some requests failed)"
        ttft, tpot = (f"{a[k]:{f}} / {b[k]:{f}}" for k, f in (("ttft_p50_ms", ".0f"), ("tpot_p50_ms", ".1f")))
        load_cell = f"concurrency {a['concurrency']:g}{failed}"
        print(f"| {load_cell} | {a['tok_s']:.1f} / {b['tok_s']:.1f} | {ratio:.2f}x | {ttft} | {tpot} |")
    if not by_level:
        sys.exit("no level was run on both sides")
    cells = [
        f"c={c:g} {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}, {len(r)} runs)"
        for c, r in by_level.items()
    ]
    print("\nthis / peer, median over runs: " + "; ".join(cells))


if __name__ == "__main__":
    main()
