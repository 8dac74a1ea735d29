"""deployments/state/store.py: records survive a new store object, read tolerantly, write atomically."""

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from deployments.state.store import RecordStore


class Job(BaseModel):
    id: str
    status: str = "queued"
    num_done: int = 0


def test_put_get_delete_and_a_new_store_sees_the_records(tmp_path: Path) -> None:
    store = RecordStore(str(tmp_path), "jobs", Job, schema_version=1)
    store.put("a", Job(id="a"))
    store.put("b/c", Job(id="b/c", status="running"))  # keys are quoted, never paths
    store.put("a", Job(id="a", num_done=3))
    again = RecordStore(f"file://{tmp_path}", "jobs", Job, schema_version=1)
    assert again.keys() == ["a", "b/c"]
    assert again.get("a") == Job(id="a", num_done=3)
    assert again.delete("b/c") and not again.delete("b/c")
    assert [r.id for r in store.all()] == ["a"]
    assert store.get("missing") is None
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["a.json"]  # nothing left aside


def test_unreadable_and_unknown_fields_are_tolerated(tmp_path: Path) -> None:
    store = RecordStore(str(tmp_path), "jobs", Job, schema_version=1)
    store.put("good", Job(id="good"))
    (tmp_path / "jobs" / "torn.json").write_text('{"schema_version": 1, "rec')
    bad = {"schema_version": 1, "record": {"num_done": "x"}}
    (tmp_path / "jobs" / "bad.json").write_text(json.dumps(bad))
    newer = {"schema_version": 1, "record": {"id": "newer", "field_of_a_later_release": [1]}}
    (tmp_path / "jobs" / "newer.json").write_text(json.dumps(newer))
    assert sorted(r.id for r in store.all()) == ["good", "newer"]
    assert store.get("torn") is None


def test_an_older_schema_goes_through_upgrade(tmp_path: Path) -> None:
    old = {"schema_version": 1, "record": {"job_id": "x", "state": "done"}}
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "x.json").write_text(json.dumps(old))

    def upgrade(version: int, raw: dict) -> dict:
        assert version == 1
        return {"id": raw["job_id"], "status": raw["state"]}

    store = RecordStore(str(tmp_path), "jobs", Job, schema_version=2, upgrade=upgrade)
    assert store.get("x") == Job(id="x", status="done")


def test_an_object_store_url_works_through_fsspec() -> None:
    store = RecordStore("memory://llmserve-state-test", "jobs", Job, schema_version=1)
    store.put("k", Job(id="k"))
    assert RecordStore("memory://llmserve-state-test", "jobs", Job, 1).get("k") == Job(id="k")
    assert store.delete("k") and store.keys() == []


def test_empty_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RecordStore(str(tmp_path), "jobs", Job, 1).put("", Job(id=""))
