"""Records that outlive Ray: one JSON file per record under a state root (a folder or an fsspec URL).

Each file holds `{"schema_version": N, "record": {...}}`. Reading is tolerant: unknown fields are
ignored, an older schema goes through the kind's `upgrade` hook, and a file that cannot be read is
logged and skipped (never an error for every reader). Writes are atomic on a local folder (written
aside, then renamed) and one PUT on an object store. The store takes no locks: each kind of record has
one owner (an actor) that serializes its changes; everyone else only reads. Its methods block (file
I/O): owners call them from a thread, never on a serving event loop.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ValidationError

logger = logging.getLogger("ray")

M = TypeVar("M", bound=BaseModel)
Upgrade = Callable[[int, dict[str, Any]], dict[str, Any]]  # (schema version found, raw record) -> current
SUFFIX = ".json"


class RecordStore(Generic[M]):
    """The records of one kind, each a pydantic model stored under a key (a name or an id)."""

    def __init__(
        self, root: str, kind: str, model: type[M], schema_version: int, upgrade: Upgrade | None = None
    ) -> None:
        self._model, self._version, self._upgrade = model, schema_version, upgrade
        self._is_local = "://" not in root or root.startswith("file://")
        if self._is_local:
            self._fs = fsspec.filesystem("file")
            base = os.path.realpath(os.path.expanduser(root.removeprefix("file://")))
        else:
            self._fs, base = url_to_fs(root)
        self.folder = posixpath.join(base.rstrip("/"), kind)
        self._fs.makedirs(self.folder, exist_ok=True)

    def _path(self, key: str) -> str:
        if not key:
            raise ValueError("a record key is required")
        return posixpath.join(self.folder, quote(key, safe="") + SUFFIX)

    def put(self, key: str, record: M) -> None:
        """Store `record` under `key`, replacing what was there (atomically)."""
        data = json.dumps({"schema_version": self._version, "record": record.model_dump(mode="json")})
        path = self._path(key)
        if self._is_local:
            aside = posixpath.join(self.folder, f".{uuid.uuid4().hex}.tmp")
            with open(aside, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(aside, path)
        else:
            self._fs.pipe_file(path, data.encode())

    def get(self, key: str) -> M | None:
        """The record under `key`; None if there is none or it cannot be read (logged)."""
        try:
            raw = self._fs.cat_file(self._path(key))
        except FileNotFoundError:
            return None
        return self._parse(key, raw)

    def delete(self, key: str) -> bool:
        """Remove the record under `key`; False if there was none."""
        try:
            self._fs.rm_file(self._path(key))
        except FileNotFoundError:
            return False
        return True

    def keys(self) -> list[str]:
        names = (posixpath.basename(p) for p in self._fs.ls(self.folder, detail=False))
        return sorted(unquote(n[: -len(SUFFIX)]) for n in names if n.endswith(SUFFIX) and n[0] != ".")

    def all(self) -> list[M]:
        """Every readable record (unreadable ones are logged and skipped)."""
        records = (self.get(key) for key in self.keys())
        return [r for r in records if r is not None]

    def _parse(self, key: str, raw: bytes) -> M | None:
        try:
            stored = json.loads(raw)
            version, record = int(stored["schema_version"]), stored["record"]
            if version != self._version and self._upgrade is not None:
                record = self._upgrade(version, record)
            return self._model.model_validate(record)
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            logger.warning("state store %s: record %r is unreadable, skipped: %s", self.folder, key, exc)
            return None
