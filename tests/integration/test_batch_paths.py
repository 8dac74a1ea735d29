"""Batch building blocks without Ray: paths under the data root, the file store, row parsing."""

import json
from pathlib import Path

import pytest

from deployments.batch.files import FileStore
from deployments.batch.rows import RowParser, render_error
from deployments.batch.storage import DataRoot
from deployments.batch.types import BatchNotFoundError, JobKind
from deployments.limits import LimitSettings
from engine.errors import InvalidRequestError


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot(str(tmp_path / "root"))


def test_local_paths_stay_under_the_root(root: DataRoot, tmp_path: Path):
    base = tmp_path / "root"
    assert root.resolve("a/b.json", field="f").path == str(base / "a/b.json")
    assert root.resolve(str(base / "x.json"), field="f").path == str(base / "x.json")
    assert root.resolve(f"file://{base}/y.json", field="f").path == str(base / "y.json")
    (tmp_path / "secret.json").write_text("{}")
    (base / "link.json").symlink_to(tmp_path / "secret.json")
    (base / "dir_link").symlink_to(tmp_path)
    for outside in (
        str(tmp_path / "secret.json"),
        "link.json",
        "dir_link/secret.json",
        "a/../../secret.json",
        "s3://bucket/x",
        "/etc/passwd",
        "",
        "bad\ud800.json",
    ):
        with pytest.raises(InvalidRequestError, match="f:"):
            root.resolve(outside, field="f")


def test_the_roots_own_folders_are_out_of_reach(root: DataRoot, tmp_path: Path):
    """files/ (uploads), jobs/ (OpenAI parts) and state/ (job records) are the server's: a user path
    there is a 400 naming the field, however it is spelled; the server's own paths pass."""
    base = tmp_path / "root"
    (base / "link").symlink_to(base / "files")
    for inside in (
        "files/file-0",
        f"{base}/jobs/x",
        f"file://{base}/state/jobs/a.json",
        "files",
        "link/x",
        "./state",
    ):
        with pytest.raises(InvalidRequestError, match=r"^f: .*keeps for itself"):
            root.resolve(inside, field="f")
    assert root.resolve("filesx/a.json", field="f").path == str(base / "filesx/a.json")
    assert root.resolve("files/file-0", field="f", is_internal=True).path == str(base / "files/file-0")
    remote = DataRoot("memory://bucket/batch")
    with pytest.raises(InvalidRequestError, match="keeps for itself"):
        remote.resolve("memory://bucket/batch/files/x", field="f")


def test_remote_root_paths(tmp_path: Path):
    root = DataRoot("memory://bucket/batch")
    relative, absolute = (
        root.resolve("in/x.json", field="f"),
        root.resolve("memory://bucket/batch/in/x.json", field="f"),
    )
    assert relative.path == absolute.path and relative.url.endswith("bucket/batch/in/x.json")
    for outside in ("memory://bucket/other/y.json", "s3://bucket/batch/y.json", "memory://bucket/batchx/y"):
        with pytest.raises(InvalidRequestError, match=r"outside|not under"):
            root.resolve(outside, field="f")
    root.resolve("in/x.json", field="f").write_bytes(b"[1]")
    assert root.resolve("memory://bucket/batch/in/x.json", field="f").read_bytes() == b"[1]"


def test_file_store(root: DataRoot):
    store = FileStore(root)
    stored = store.put(b"abc", "in.jsonl", "batch")
    assert store.get(stored.id) == stored and store.content(stored.id) == b"abc"
    assert [f.id for f in store.list()] == [stored.id] and store.list("batch_output") == []
    store.delete(stored.id)
    for bad_id in (stored.id, "../../etc/passwd", "file-nope"):
        with pytest.raises(BatchNotFoundError):
            store.get(bad_id)


def test_openai_line_errors_name_the_field():
    parser = RowParser(JobKind.OPENAI, "tiny")
    good = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "tiny", "prompt": "x"},
    }
    row = parser.parse(0, json.dumps(good))
    assert row.custom_id == "a" and row.request.is_raw_prompt and not row.is_chat
    cases = [
        ("{not json", "malformed JSON"),
        (json.dumps({**good, "custom_id": ""}), "custom_id"),
        (json.dumps({**good, "method": "GET"}), "method"),
        (json.dumps({**good, "url": "/v1/embeddings"}), "url"),
        (json.dumps({**good, "body": {"model": "other", "prompt": "x"}}), "body.model"),
        (json.dumps({**good, "url": "/v1/chat/completions"}), "does not match url"),
    ]
    for payload, words in cases:
        with pytest.raises(InvalidRequestError, match=words):
            parser.parse(1, payload)
    record = render_error(
        JobKind.OPENAI, 3, json.dumps({**good, "method": "GET"}), InvalidRequestError("bad")
    )
    assert record["custom_id"] == "a" and record["error"] == {
        "code": "invalid_request_error",
        "message": "bad",
        "line": 4,
    }
    assert record["response"]["status_code"] == 400


def test_v1_rows_share_the_settings():
    parser = RowParser(JobKind.V1, "tiny", {"prompts": ["a"], "max_new_tokens": 3, "temperature": 0.0})
    row = parser.parse(0, json.dumps("Hello"))
    assert row.request.prompt == "Hello" and row.request.params.max_new_tokens == 3
    assert not row.request.is_raw_prompt  # the LLM Engine routes' chat template rule applies


def test_batch_routes_need_a_key_and_uploads_have_their_own_limit():
    """The guard in front of the batch routes (no Ray: it answers before any route runs)."""
    from fastapi.testclient import TestClient
    from pydantic import SecretStr

    from deployments.guard import GuardSettings
    from deployments.ingress import app

    saved = {name: getattr(app.state, name, None) for name in ("guard", "batch")}
    limits = (("/v1/files", 2048, "batch.max_upload_bytes"),)
    app.state.guard = GuardSettings(api_keys=(SecretStr("k"),), path_body_limits=limits)
    app.state.batch = None
    try:
        client = TestClient(app)
        for method, path in [
            ("post", "/v1/llm/batch-completions"),
            ("post", "/v2/batch-completions"),
            ("post", "/v2/batch-completions/job_x/actions/cancel"),
            ("get", "/v2/batch-completions/job_x"),
            ("post", "/v1/batches"),
            ("post", "/v1/batches/batch_x/cancel"),
            ("post", "/v1/files"),
        ]:
            assert getattr(client, method)(path).status_code == 401, path
        headers = {"x-api-key": "k"}
        big = client.post("/v1/files", headers=headers, files={"file": ("f", b"x" * 3000)})
        assert big.status_code == 413 and "batch.max_upload_bytes" in big.text
        small = client.post("/v1/files", headers=headers, files={"file": ("f", b"x" * 100)})
        assert small.status_code == 503 and "batch jobs are not enabled" in small.text
    finally:
        for name, value in saved.items():
            setattr(app.state, name, value)


def test_rows_obey_the_limits_section():
    limits = LimitSettings(max_prompt_chars=10, max_stop_sequences=1)
    v1 = RowParser(JobKind.V1, "tiny", {"max_new_tokens": 3, "temperature": 0.0}, limits)
    with pytest.raises(InvalidRequestError, match=r"limits\.max_prompt_chars"):
        v1.parse(0, json.dumps("x" * 11))
    v2 = RowParser(JobKind.V2, "tiny", limits=limits)
    with pytest.raises(InvalidRequestError, match=r"limits\.max_stop_sequences"):
        v2.parse(0, json.dumps({"prompt": "hi", "stop": ["a", "b"]}))
    with pytest.raises(InvalidRequestError, match=r"limits\.max_prompt_chars"):
        v2.parse(0, json.dumps({"messages": [{"role": "user", "content": "y" * 11}]}))
