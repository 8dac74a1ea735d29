"""Uploaded and produced files: one store under `<data_root>/files/`, shared by both clients' File APIs.

Each file is `<id>` (the bytes) next to `<id>.json` (its metadata), so every ingress replica and every
job runner sees the same store; nothing of it lives in a process.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass

from deployments.batch.storage import BatchPath, DataRoot
from deployments.batch.types import BatchNotFoundError
from engine.errors import InvalidRequestError

FILES_FOLDER = "files"
_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file's metadata, as both the OpenAI and the LLM Engine file objects are built from it."""

    id: str
    filename: str
    bytes: int
    created_at: int
    purpose: str  # "batch" (uploads), "batch_output" (produced by a job)


class FileStore:
    def __init__(self, root: DataRoot) -> None:
        self._root = root

    def _data(self, file_id: str) -> BatchPath:
        if not _FILE_ID.match(file_id):
            raise BatchNotFoundError(f"no file with id {file_id!r}")
        return self._root.internal(FILES_FOLDER, file_id)

    def _meta(self, file_id: str) -> BatchPath:
        return self._root.internal(FILES_FOLDER, f"{file_id}.json")

    def put(self, content: bytes, filename: str, purpose: str) -> StoredFile:
        if not filename or len(filename) > 512:
            raise InvalidRequestError("file: a filename of 1 to 512 characters is required")
        file_id = f"file-{uuid.uuid4().hex}"
        stored = StoredFile(file_id, filename, len(content), int(time.time()), purpose)
        self._data(file_id).write_bytes(content)
        self._meta(file_id).write_bytes(json.dumps(asdict(stored)).encode())
        return stored

    def get(self, file_id: str) -> StoredFile:
        meta = self._meta(self._data(file_id).path.rsplit("/", 1)[-1])
        if not meta.exists():
            raise BatchNotFoundError(f"no file with id {file_id!r}")
        return StoredFile(**json.loads(meta.read_bytes()))

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        return self._data(file_id).read_bytes()

    def path_of(self, file_id: str) -> BatchPath:
        """Where a stored file's bytes are (a job reads its input file there)."""
        self.get(file_id)
        return self._data(file_id)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        for location in (self._data(file_id), self._meta(file_id)):
            location.fs.rm(location.path)

    def list(self, purpose: str | None = None) -> list[StoredFile]:
        folder = self._root.internal(FILES_FOLDER)
        if not folder.exists():
            return []
        names = [p.rsplit("/", 1)[-1] for p in folder.fs.ls(folder.path, detail=False)]
        files = [self.get(n.removesuffix(".json")) for n in names if n.endswith(".json")]
        files = [f for f in files if purpose is None or f.purpose == purpose]
        return sorted(files, key=lambda f: (f.created_at, f.id), reverse=True)
