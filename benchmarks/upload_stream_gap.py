"""Uploads against serving: a stream's largest gap between events while four large uploads run.

Starts `serve run` of the fake-engine app (tests/deployments/fake_serve_app.py: tokens 0.2 s apart
for a "[slow]" prompt, no model) on a free port in a Ray of its own, streams 50 tokens alone and then
while `--num-uploads` uploads of `--upload-mib` MiB run (curl, separate processes, so the client's
own work does not show in the gaps), and prints both largest gaps per round. `--repo` runs another
checkout (an older commit) the same way, for a before/after in one sitting:

    python benchmarks/upload_stream_gap.py [--repo .] [--rounds 2] [--num-uploads 4] [--upload-mib 63]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

SLOW_PROMPT = {"prompt": "[slow] hello", "max_new_tokens": 50, "temperature": 0}
STREAM_ROUTE = "v1/llm/completions-stream?model_endpoint_name=fake"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(repo: Path, work: Path, port: int) -> subprocess.Popen:
    config = work / "config.yaml"
    app = {"name": "gap", "route_prefix": "/", "import_path": "tests.deployments.fake_serve_app:build"}
    app["args"] = {"batch": {"data_root": str(work / "root")}}
    http = {"host": "127.0.0.1", "port": port}
    serve_config = {"proxy_location": "HeadOnly", "http_options": http, "applications": [app]}
    config.write_text(yaml.safe_dump(serve_config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_SERVE_ENABLE_HA_PROXY="0", PYTHONPATH=str(repo))
    serve = Path(sys.executable).with_name("serve")
    return subprocess.Popen(
        [str(serve), "run", str(config)],
        cwd=repo,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def kill_session(session_id: int) -> None:
    """SIGKILL `serve run`, its Ray and Ray's workers (all in the session it leads)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(stat.parent.name), signal.SIGKILL)


async def largest_gap(client: httpx.AsyncClient, url: str) -> float:
    times = []
    async with client.stream("POST", url + STREAM_ROUTE, json=SLOW_PROMPT, timeout=120) as answer:
        async for line in answer.aiter_lines():
            if line.startswith("data:"):
                times.append(time.monotonic())
    return max(b - a for a, b in itertools.pairwise(times))


async def measure(url: str, upload: Path, args: argparse.Namespace) -> None:
    async with httpx.AsyncClient() as client:
        deadline = time.monotonic() + 300
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url + "healthz", timeout=5)).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start")
            await asyncio.sleep(1)
        await largest_gap(client, url)  # warm
        for number in range(args.rounds):
            alone = await largest_gap(client, url)
            stream = asyncio.create_task(largest_gap(client, url))
            await asyncio.sleep(0.5)
            command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-F", f"file=@{upload}"]
            uploads = [
                await asyncio.create_subprocess_exec(*command, url + "v1/files", stdout=subprocess.PIPE)
                for _ in range(args.num_uploads)
            ]
            loaded = await stream
            statuses = [(await u.communicate())[0].decode() for u in uploads]
            print(
                f"round {number}: largest gap alone {alone:.3f} s, with {args.num_uploads} x "
                f"{args.upload_mib} MiB uploads {loaded:.3f} s (upload statuses {statuses})",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-uploads", type=int, default=4)
    parser.add_argument("--upload-mib", type=int, default=63)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="upload-gap-") as folder:
        work = Path(folder)
        upload = work / "upload.bin"
        upload.write_bytes(os.urandom(args.upload_mib * 1024**2))
        port = free_port()
        server = start_server(args.repo.resolve(), work, port)
        try:
            asyncio.run(measure(f"http://127.0.0.1:{port}/", upload, args))
        finally:
            kill_session(server.pid)
            server.wait()


if __name__ == "__main__":
    main()
