"""serve_bench's setup lines (benchmarks/bench_setup.py): the CPU kind, and a peer's version and settings
read from its endpoints, its command line and its environment."""

import asyncio
import os
import socket
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from benchmarks.bench_setup import cpu_kind, peer_server, wait_until_ready
from benchmarks.prompts import shared_prefix_prompt_texts

ICE_LAKE = """processor\t: 0
cpu family\t: 6
model\t\t: 106
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
flags\t\t: fpu sse avx2 fma avx512f avx512bw avx512_vnni
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor @ 2.80GHz
"""

# A stand-in for vLLM's OpenAI server: /version, and /metrics with its cache_config_info gauge
_PEER = """
import sys
from aiohttp import web
labels = 'block_size="16",cache_dtype="auto",enable_prefix_caching="True",num_gpu_blocks="5461"'
metrics = "vllm:cache_config_info{" + labels + "} 1.0\\n"
app = web.Application()
app.router.add_get("/version", lambda r: web.json_response({"version": "0.32.0"}))
app.router.add_get("/metrics", lambda r: web.Response(text=metrics))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def test_the_cpu_kind_names_the_model_and_the_extensions_that_pick_the_kernels():
    kind = cpu_kind(ICE_LAKE)
    assert kind.startswith("Intel(R) Xeon(R) Processor @ 2.80GHz (family 6 model 106); ")
    assert "avx512_vnni avx512f avx2 fma" in kind
    assert "no avx512_bf16 amx_bf16" in kind
    assert "avx512_bf16 " not in kind.split(", no")[0]


def test_a_local_peer_is_described_by_its_endpoints_command_line_and_environment():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    args = [sys.executable, "-c", _PEER, str(port), "--dtype", "float32", "--max-num-seqs", "64"]
    peer = subprocess.Popen(args, env=env)
    url = f"http://127.0.0.1:{port}"

    async def describe() -> str:
        async with aiohttp.ClientSession() as session:
            for _ in range(600):  # until it listens (or 60 s)
                try:
                    async with session.get(url + "/version"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            return await peer_server(session, url)

    try:
        line = asyncio.run(describe())
    finally:
        peer.kill()
        peer.wait()
    assert line.startswith("version 0.32.0, KV cache 87,376 tokens (5461 blocks of 16), prefix caching True")
    assert f"pid {peer.pid}: dtype float32, max-num-seqs 64" in line
    assert "VLLM_CPU_KVCACHE_SPACE=2, VLLM_CPU_NUM_OF_RESERVED_CPU=0" in line


def test_an_unreachable_peer_says_what_is_unknown():
    async def describe() -> str:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            return await peer_server(session, "http://127.0.0.1:9")

    line = asyncio.run(describe())
    assert line.startswith("version unknown (ClientConnectorError)")
    assert "no process of this machine listens on port 9" in line


def test_shared_prefix_prompts_share_their_header_and_nothing_after_it():
    prompts = shared_prefix_prompt_texts(3, "run1", 40)
    header = prompts[0].split("\n")[0]
    assert len(header.split()) == 40 and all(p.startswith(header + "\n[run1-") for p in prompts)
    assert shared_prefix_prompt_texts(1, "run2", 40)[0].startswith(header)  # the same in every run
    assert len({p[len(header) :] for p in prompts}) == 3


async def _serve(readyz: list[int], models: int):
    """A server whose /readyz answers `readyz` in turn (the last from then on) and /v1/models `models`;
    its runner, URL and how often /readyz was asked."""
    asked: list[int] = []

    async def ready(request: web.Request) -> web.Response:
        asked.append(1)
        return web.Response(status=readyz[min(len(asked), len(readyz)) - 1])

    app = web.Application()
    app.router.add_get("/readyz", ready)
    app.router.add_get("/v1/models", lambda request: web.Response(status=models))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}", asked


async def _wait(readyz: list[int], models: int, timeout_s: float = 30) -> int:
    runner, url, asked = await _serve(readyz, models)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_ready(session, url, timeout_s=timeout_s, poll_s=0.01)
    finally:
        await runner.cleanup()
    return len(asked)


@pytest.mark.parametrize(
    ("readyz", "models", "num_asks"),
    [
        ([503, 503, 200], 200, 3),  # models loading, then every one loaded
        ([404, 404, 200], 404, 3),  # Serve still deploying the app: 404 everywhere, then ready
        ([200], 200, 1),
        ([404], 200, 2),  # an OpenAI server without /readyz (vLLM): ready when /v1/models answers
    ],
)
def test_the_benchmark_waits_for_every_model_to_load(readyz, models, num_asks):
    assert asyncio.run(_wait(readyz, models)) >= num_asks


def test_a_server_that_never_gets_ready_ends_the_benchmark():
    with pytest.raises(SystemExit, match="did not answer 200"):
        asyncio.run(_wait([503], 200, timeout_s=0.05))
