"""What a side-by-side serving benchmark ran on, printed with its tables (serve_bench.py --peer).

- The CPU kind: its model name and the vector extensions that decide which kernels run (AVX-512 BF16,
  AVX-512F, AVX2, VNNI, AMX), and the cores this process may use.
- This server's engine settings, from the model config it was started with (dtype, weight format,
  max_num_seqs, KV-cache size, prefix caching).
- The peer (an OpenAI-compatible server such as vLLM-CPU): its version from `GET /version`, its cache
  settings from `GET /metrics` (vLLM's `cache_config_info`: prefix caching, block count and size), and,
  when it runs on this machine, its dtype and limits from its command line and its CPU settings from
  its environment (`VLLM_CPU_KVCACHE_SPACE`, `VLLM_CPU_NUM_OF_RESERVED_CPU`, ...), found through the
  process that listens on the peer's port. What cannot be read says so instead of guessing.

Before the first level, `wait_until_ready` holds until this server's models are all loaded.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import psutil

VECTOR_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx512f", "avx2", "fma")
PEER_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")
PEER_ARGS = ("--dtype", "--max-num-seqs", "--max-model-len", "--max-num-batched-tokens", "--quantization")
PEER_SWITCHES = ("--enable-prefix-caching", "--no-enable-prefix-caching", "--enforce-eager")


def cpu_kind(cpuinfo: str | None = None) -> str:
    """'Intel(R) Xeon(R) ... (family 6 model 106); avx512f avx512_vnni avx2 fma; 2 cores usable'."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "unknown CPU")
    family = f" (family {fields['cpu family']} model {fields['model']})" if "cpu family" in fields else ""
    flags = set(fields.get("flags", "").split())
    have = [f for f in VECTOR_FLAGS if f in flags]
    missing = [f for f in ("avx512_bf16", "amx_bf16") if f not in flags]
    lacks = f", no {' '.join(missing)}" if missing and fields.get("flags") else ""
    cores = len(os.sched_getaffinity(0))
    return f"{name}{family}; {' '.join(have) or 'no vector flags read'}{lacks}; {cores} cores usable"


def this_server(model_config: str) -> str:
    """The engine settings of the model config this server was started with (as the benchmark reads it)."""
    try:
        import yaml

        engine = (yaml.safe_load(Path(model_config).read_text()) or {}).get("engine") or {}
    except (OSError, ValueError, ImportError) as exc:
        return f"model config {model_config} not read ({exc})"
    from engine.types import EngineConfig

    defaults = EngineConfig()
    settings = {
        "dtype": engine.get("dtype", defaults.dtype),
        "weights": engine.get("weight_format", getattr(defaults, "weight_format", "dtype")),
        "max_num_seqs": engine.get("max_num_seqs", defaults.max_num_seqs),
        "KV cache": f"{engine.get('kv_cache_bytes', defaults.kv_cache_bytes) / 2**20:.0f} MiB",
        "prefix caching": engine.get("enable_prefix_caching", defaults.enable_prefix_caching),
    }
    return f"{model_config}: " + ", ".join(f"{k} {v}" for k, v in settings.items())


async def peer_server(session: aiohttp.ClientSession, url: str) -> str:
    """The peer's version and settings, as far as it and this machine tell them."""
    parts = [f"version {await _get_text(session, url + '/version', json_key='version')}"]
    metrics = await _get_text(session, url + "/metrics")
    cache = re.search(r"cache_config_info\{([^}]*)\}", metrics)
    if cache:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', cache.group(1)))
        blocks, size = labels.get("num_gpu_blocks"), labels.get("block_size")
        if blocks and size and blocks.isdigit() and size.isdigit():
            parts.append(f"KV cache {int(blocks) * int(size):,} tokens ({blocks} blocks of {size})")
        if "enable_prefix_caching" in labels:
            parts.append(f"prefix caching {labels['enable_prefix_caching']}")
        if "cache_dtype" in labels:
            parts.append(f"cache dtype {labels['cache_dtype']}")
    else:
        parts.append("cache settings not published at /metrics")
    parts.append(_local_process(url))
    return ", ".join(parts)


async def _get_text(session: aiohttp.ClientSession, url: str, json_key: str | None = None) -> str:
    try:
        async with session.get(url) as response:
            if response.status != 200:
                return f"unknown (HTTP {response.status})"
            if json_key is not None:
                return str((await response.json()).get(json_key, "unknown"))
            return await response.text()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"unknown ({type(exc).__name__})"


def _local_process(url: str) -> str:
    """The command-line settings and CPU environment of the local process listening on url's port."""
    port = urlparse(url).port
    process = _listener(port) if port else None
    if process is None:
        return f"no process of this machine listens on port {port} (dtype and CPU settings unknown)"
    try:
        argv, environ = process.cmdline(), process.environ()
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
        return f"pid {process.pid} (command line unreadable)"
    found = []
    for flag in PEER_ARGS:
        if flag in argv[:-1]:
            found.append(f"{flag.lstrip('-')} {argv[argv.index(flag) + 1]}")
    found += [flag.lstrip("-") for flag in PEER_SWITCHES if flag in argv]
    found += [f"{name}={environ[name]}" for name in PEER_ENV if name in environ]
    if "--dtype" not in argv:
        found.append("dtype auto (no --dtype)")
    return f"pid {process.pid}: " + ", ".join(found)


def _listener(port: int) -> psutil.Process | None:
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                return psutil.Process(conn.pid)
            except psutil.NoSuchProcess:
                return None
    return None


async def wait_until_ready(
    session: aiohttp.ClientSession, url: str, timeout_s: float, poll_s: float = 1.0
) -> float:
    """Wait until the server's `/readyz` answers 200 (every configured model loaded) and return the
    seconds waited. `/healthz` answers as soon as the ingress runs, while the models may still load: a
    level started then shares the cores with their loading (Gemma 3's took ~14 CPU-s, ~13 s after
    /healthz, on 2 cores). A server without `/readyz` (404) is ready once `/v1/models` answers 200 (an
    OpenAI server); Serve answers 404 to both while the app deploys. SystemExit after `timeout_s`."""
    start = time.monotonic()
    while True:
        if await _status(session, f"{url}/readyz") == 200:
            return time.monotonic() - start
        if (
            await _status(session, f"{url}/v1/models") == 200
            and await _status(session, f"{url}/readyz") == 404
        ):
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise SystemExit(f"{url}/readyz did not answer 200 within {timeout_s:.0f} s")
        await asyncio.sleep(poll_s)


async def _status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as response:
            return response.status
    except aiohttp.ClientError:
        return None


def kernel_builds(load, names: list[str]) -> dict:
    """`load(variant)` for each named build variant (engine/native_build.py) this CPU runs, keyed
    "name (isa)"; a variant this CPU cannot run, or a build with no path for it, is said and left out."""
    from engine import native_build

    runnable = {v.name: v for v in native_build.runnable_variants()}
    builds = {}
    for name in names:
        kernel = load(runnable[name]) if name in runnable else None
        if kernel is None:
            print(f"build {name}: not runnable or not built on this CPU, left out")
            continue
        builds[f"{name} ({kernel.isa})"] = kernel
    return builds
