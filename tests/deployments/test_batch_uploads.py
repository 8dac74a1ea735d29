"""Uploads and the file routes on the real ingress app, in process (no Ray): streamed, bounded, off the loop.

The app is the ingress's FastAPI app with a batch context over a temporary data root, driven through
httpx's ASGI transport, so each rule is checked on the code that serves it without a cluster.
"""

from __future__ import annotations

import asyncio
import json
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.batch.config import BatchSettings
from deployments.batch.files import FileStore
from deployments.batch.service import BatchContext
from deployments.batch.storage import DataRoot
from deployments.batch.uploads import UPLOAD_CHUNK_BYTES
from deployments.guard import GuardSettings
from deployments.ingress import app

BOUNDARY = "llmserve-test-boundary"
CHUNK = 64 * 1024


@pytest.fixture
def context(tmp_path: Path) -> Iterator[BatchContext]:
    """The ingress app with batch on over `tmp_path` (2 uploads at once); its state restored after."""
    saved = {name: getattr(app.state, name, None) for name in ("guard", "batch")}
    make_schema = app.openapi
    app.state.guard = GuardSettings()
    settings = BatchSettings(
        data_root=str(tmp_path / "root"), max_upload_bytes=64 * 1024**2, max_concurrent_uploads=2
    )
    context = BatchContext(settings, {})
    context.install(app, start_registry=False)
    try:
        yield context
    finally:
        for name, value in saved.items():
            setattr(app.state, name, value)
        app.openapi = make_schema


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def multipart_head(filename: str = "in.jsonl", purpose: str | None = "batch") -> bytes:
    head = b""
    if purpose is not None:
        head += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'.encode()
        )
    return (
        head
        + (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
    )


TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


async def body(num_bytes: int, gate: asyncio.Event | None = None, sent: asyncio.Event | None = None):
    """A multipart body of `num_bytes` file bytes in CHUNK pieces, made as they are sent; with `gate`,
    the file's first piece is sent, then `sent` is set and the rest waits for `gate`."""
    yield multipart_head()
    for offset in range(0, num_bytes, CHUNK):
        yield bytes([offset // CHUNK % 251]) * min(CHUNK, num_bytes - offset)
        if gate is not None and offset == 0:
            sent.set()
            await gate.wait()
    yield TAIL


async def test_an_upload_streams_to_storage_holding_one_chunk(context: BatchContext):
    """The most Python memory an upload holds at once is under three chunks (1 MiB each: the one being
    filled, at worst the one just written while its thread lets go of it), for 4 MiB as for 16 MiB.
    The guard and FastAPI held the whole body two to three times before (48 MiB for 16 MiB)."""
    peaks = {}
    async with client() as http:
        await http.post("/v1/files", content=body(CHUNK), headers=HEADERS)  # first-use imports and caches
        for num_bytes in (4 * 1024**2, 16 * 1024**2):
            tracemalloc.start()
            try:
                answer = await http.post("/v1/files", content=body(num_bytes), headers=HEADERS)
                peaks[num_bytes] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert answer.status_code == 200, answer.text
            stored = answer.json()
            assert (stored["bytes"], stored["filename"]) == (num_bytes, "in.jsonl"), stored
            data = Path(context.settings.data_root) / "files" / stored["id"]
            assert data.stat().st_size == num_bytes and data.read_bytes()[CHUNK : CHUNK + 1] == b"\x01"
    in_mib = {n // 1024**2: round(p / 1024**2, 2) for n, p in peaks.items()}
    assert max(peaks.values()) < 3 * UPLOAD_CHUNK_BYTES, f"peak MiB by upload MiB: {in_mib}"


async def test_uploads_past_the_limit_are_refused_at_once(context: BatchContext):
    """batch.max_concurrent_uploads=2: two uploads hold their slots (each waits inside its body, an
    event the test controls); a third is a 429 naming the setting; once they end, uploads pass again."""
    gate = asyncio.Event()
    started = [asyncio.Event(), asyncio.Event()]
    async with client() as http:
        held = [
            asyncio.create_task(http.post("/v1/files", content=body(3 * CHUNK, gate, s), headers=HEADERS))
            for s in started
        ]
        await asyncio.gather(*(s.wait() for s in started))  # both routes are reading their bodies
        refused = await http.post("/v1/files", content=body(CHUNK), headers=HEADERS)
        assert refused.status_code == 429, refused.text
        assert "batch.max_concurrent_uploads=2" in refused.json()["error"]["message"]
        gate.set()
        assert [(await task).status_code for task in held] == [200, 200]
        assert (await http.post("/v1/files", content=body(CHUNK), headers=HEADERS)).status_code == 200
    assert context.uploads.num_active == 0


async def test_bad_uploads_are_a_4xx_and_leave_nothing_behind(context: BatchContext):
    cases = [
        (multipart_head() + b"abc", HEADERS, 400, "closing boundary"),  # cut short
        (multipart_head(purpose="nope") + b"abc" + TAIL, HEADERS, 400, "purpose"),
        (f"--{BOUNDARY}--\r\n".encode(), HEADERS, 400, "named 'file'"),
        (multipart_head() + b"a" + TAIL, {"content-type": "application/json"}, 400, "multipart/form-data"),
        (multipart_head() + b"a" * (64 * 1024**2 + 1) + TAIL, {**HEADERS}, 413, "batch.max_upload_bytes"),
    ]
    async with client() as http:
        for content, headers, status, words in cases:

            async def stream(content: bytes = content) -> AsyncIterator[bytes]:  # no content-length
                for i in range(0, len(content), CHUNK):
                    yield content[i : i + CHUNK]

            answer = await http.post("/v1/files", content=stream(), headers=headers)
            assert answer.status_code == status and words in answer.json()["error"]["message"], answer.text
        assert (await http.get("/v1/files")).json()["data"] == []
    assert list((Path(context.settings.data_root) / "files").iterdir()) == []  # no partial file left


async def test_the_file_list_skips_what_is_not_a_file(context: BatchContext):
    """A stray file in files/ (a job once wrote evil.json there), a partial upload, broken metadata:
    the list still answers with every real file (it was a 404 for everyone)."""
    store = FileStore(DataRoot(context.settings.data_root))
    real = store.put(b"[1]", "real.json", "batch")
    folder = Path(context.settings.data_root) / "files"
    (folder / "evil.json").write_text("[]")
    (folder / "file-0123456789abcdef0123456789abcdef").write_bytes(b"partial upload, no metadata")
    (folder / "file-fedcba9876543210fedcba9876543210.json").write_text("{not json")
    (folder / "file-00000000000000000000000000000000.json").write_text(json.dumps({"id": "other"}))
    (folder / "nested.json").mkdir()
    async with client() as http:
        listed = await http.get("/v1/files")
        assert listed.status_code == 200, listed.text
        assert [f["id"] for f in listed.json()["data"]] == [real.id]
        broken = await http.get("/v1/files/file-fedcba9876543210fedcba9876543210")
        assert broken.status_code == 404 and "unreadable" in broken.json()["error"]["message"]


async def test_file_routes_do_no_file_io_on_the_event_loop(context: BatchContext):
    """Every filesystem call of the file routes and of a create's path checks runs in a thread."""
    loop_thread = threading.get_ident()
    calls: list[tuple[str, bool]] = []
    root = context.root
    root._fs = _Recording(root._fs, calls, loop_thread)
    async with client() as http:
        uploaded = (await http.post("/v1/files", content=body(3 * CHUNK), headers=HEADERS)).json()
        file_id = uploaded["id"]
        assert (await http.get("/v1/files")).status_code == 200
        assert (await http.get(f"/v1/files/{file_id}")).status_code == 200
        raw = await http.get(f"/v1/files/{file_id}/content", headers={"accept": "application/binary"})
        assert len(raw.content) == 3 * CHUNK
        assert (await http.get(f"/v1/files/{file_id}/content")).json()["id"] == file_id
        context.model_configs_json["m"] = "{}"
        refused = await http.post(  # the spec's path checks run, then the reserved folder is refused
            "/v1/llm/batch-completions",
            json={"output_data_path": "files/x.json", "model_config": {"model": "m"}, "input_data_path": "a"},
        )
        assert refused.status_code == 400
        assert (await http.delete(f"/v1/files/{file_id}")).status_code == 200
    assert calls and not [name for name, on_loop in calls if on_loop], calls


class _Recording:
    """An fsspec filesystem (and the files it opens) that notes each call and whether it ran on the loop."""

    def __init__(self, inner: Any, calls: list, loop_thread: int) -> None:
        self._inner, self._calls, self._loop_thread = inner, calls, loop_thread

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if not callable(value) or name.startswith("__"):
            return value

        def call(*args, **kwargs):
            self._calls.append((name, threading.get_ident() == self._loop_thread))
            result = value(*args, **kwargs)
            return _Recording(result, self._calls, self._loop_thread) if name == "open" else result

        return call

    def __enter__(self) -> _Recording:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._calls.append(("close", threading.get_ident() == self._loop_thread))
        self._inner.__exit__(*exc)


def test_the_published_schema_states_the_upload_bounds(context: BatchContext):
    from fastapi.testclient import TestClient

    schema = TestClient(app).get("/openapi.json").json()
    operation = schema["paths"]["/v1/files"]["post"]
    assert "429" in operation["responses"] and "413" in operation["responses"]
    description = operation["description"]
    for words in ("batch.max_concurrent_uploads", "At most 2 uploads", str(64 * 1024**2), "1048576 bytes"):
        assert words in description, description
    assert operation["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
