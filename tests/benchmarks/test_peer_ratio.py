"""Runs made one server at a time (serve_bench.py --save) paired into ratios (benchmarks/peer_ratio.py)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A stand-in OpenAI server that streams `max_tokens` tokens, `gap` seconds apart, with the usage event.
_SERVER = """
import asyncio, json, sys
from aiohttp import web
gap = float(sys.argv[2])
async def completions(request):
    body = await request.json()
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    n = body["max_tokens"]
    for i in range(n):
        await asyncio.sleep(gap)
        event = {"choices": [{"index": 0, "text": "x"}], "usage": None}
        await response.write(f"data: {json.dumps(event)}\\n\\n".encode())
    usage = {"choices": [], "usage": {"completion_tokens": n}}
    await response.write(f"data: {json.dumps(usage)}\\n\\ndata: [DONE]\\n\\n".encode())
    return response
app = web.Application()
app.router.add_post("/v1/completions", completions)
app.router.add_get("/v1/models", lambda r: web.json_response({"data": []}))
app.router.add_get("/version", lambda r: web.json_response({"version": "0.0-stand-in"}))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bench(port: int, save: Path, *extra: str) -> None:
    args = ["--url", f"http://127.0.0.1:{port}", "--concurrency", "1", "2", "--max-tokens", "4"]
    command = [
        sys.executable,
        "benchmarks/serve_bench.py",
        *args,
        "--settle-s",
        "0",
        "--save",
        str(save),
        *extra,
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=120)


def _ratio(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/peer_ratio.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)


def test_two_servers_measured_one_at_a_time_are_paired_level_by_level(tmp_path):
    saved = {}
    for side, gap in (("this", "0.005"), ("peer", "0.02")):
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), gap])
        try:
            for run in (1, 2):
                saved[side, run] = tmp_path / f"{side}-{run}.json"
                _bench(port, saved[side, run], *(["--as-peer"] if side == "peer" else []))
        finally:
            server.terminate()
            server.wait(10)
    this = json.loads(saved["this", 1].read_text())
    peer = json.loads(saved["peer", 1].read_text())
    assert this["side"] == "this" and peer["side"] == "peer"
    assert "version 0.0-stand-in" in peer["server"]  # described as --peer describes a peer
    assert this["server"].startswith("configs/smollm2-135m-instruct.yaml")  # this app's engine settings
    assert [lv["concurrency"] for lv in this["levels"]] == [1, 2]
    assert all(
        lv["ok"] == lv["requests"] for run in saved.values() for lv in json.loads(run.read_text())["levels"]
    )

    result = _ratio(
        str(saved["this", 1]), str(saved["this", 2]), "--peer", str(saved["peer", 1]), str(saved["peer", 2])
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| concurrency")]
    assert len(rows) == 4  # two levels, two runs of each
    expected = this["levels"][0]["tok_s"] / peer["levels"][0]["tok_s"]
    assert f"| {expected:.2f}x |" in rows[0]
    assert "c=1 " in result.stdout and "2 runs" in result.stdout
    assert f"CPU: {this['cpu']}" in result.stdout


def _saved(path: Path, role: str, **changes) -> str:
    record = {
        "side": role,
        "url": "http://x@m",
        "cpu": "a CPU",
        "server": f"{role} settings",
        "load": {"api": "openai", "max_tokens": 64, "prompt_words": 0, "shared_prefix_words": 0},
        "finished": "2026-12-07 13:00:00",
        "levels": [
            {
                "label": "c",
                "concurrency": c,
                "tok_s": t,
                "ttft_p50_ms": 1.0,
                "tpot_p50_ms": 1.0,
                "ok": 1,
                "requests": 1,
            }
            for c, t in ((1, 60.0 if role == "this" else 30.0), (16, 500.0 if role == "this" else 400.0))
        ],
    }
    record.update(changes)
    path.write_text(json.dumps(record))
    return str(path)


def test_the_ratios_are_the_saved_throughputs_over_the_peers(tmp_path):
    result = _ratio(_saved(tmp_path / "a.json", "this"), "--peer", _saved(tmp_path / "b.json", "peer"))
    assert result.returncode == 0, result.stderr
    assert "| 60.0 / 30.0 | 2.00x |" in result.stdout and "| 500.0 / 400.0 | 1.25x |" in result.stdout
    assert "this server: this settings" in result.stdout and "peer: peer settings" in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cpu": "another CPU"}, "the runs differ in cpu"),
        (
            {"load": {"api": "openai", "max_tokens": 128, "prompt_words": 0, "shared_prefix_words": 0}},
            "differ in load",
        ),
        ({"side": "this"}, "saved as the 'this' side"),
    ],
)
def test_runs_that_do_not_compare_are_refused(tmp_path, change, message):
    peer = _saved(tmp_path / "b.json", "peer", **change)
    result = _ratio(_saved(tmp_path / "a.json", "this"), "--peer", peer)
    assert result.returncode != 0 and message in result.stderr
