"""Uploaded and produced files: one store under `<data_root>/files/`, shared by both clients' File APIs.

Each file is `<id>` (the bytes) next to `<id>.json` (its metadata), so every ingress replica and every
job runner sees the same store; nothing of it lives in a process. The metadata is written last: a file
is listed only once its bytes are complete, and anything else in the folder (a partial upload, a stray
file) is skipped by the list, never an error for every reader. Every method blocks (file I/O): the
routes call them from a thread.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from deployments.batch.storage import FILES_FOLDER, BatchPath, DataRoot
from deployments.batch.types import BatchNotFoundError
from engine.errors import InvalidRequestError

logger = logging.getLogger("ray.serve")
_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
META_SUFFIX = ".json"
READ_CHUNK_BYTES = 1024 * 1024
MAX_FILENAME_CHARS = 512


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file's metadata, as both the OpenAI and the LLM Engine file objects are built from it."""

    id: str
    filename: str
    bytes: int
    created_at: int
    purpose: str  # "batch" (uploads), "batch_output" (produced by a job)


_FIELDS = tuple(f.name for f in dataclasses.fields(StoredFile))


class FileWriter:
    """One file being written chunk by chunk (an upload): `write`, then `commit` or `abort`."""

    def __init__(self, store: FileStore, file_id: str, filename: str) -> None:
        self._store, self._id, self._filename = store, file_id, filename
        data = store._data(file_id)
        data.fs.makedirs(data.fs._parent(data.path), exist_ok=True)
        self._file = data.fs.open(data.path, "wb")
        self.num_bytes = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self.num_bytes += len(chunk)

    def write_pieces(self, pieces: list[bytes]) -> None:
        """Write `pieces` in order (never joined: no second copy of them in memory)."""
        self._file.writelines(pieces)
        self.num_bytes += sum(len(p) for p in pieces)

    def commit(self, purpose: str) -> StoredFile:
        """Close the bytes, then write the metadata: from now on the file is listed."""
        self._file.close()
        stored = StoredFile(self._id, self._filename, self.num_bytes, int(time.time()), purpose)
        self._store._meta(self._id).write_bytes(json.dumps(asdict(stored)).encode())
        return stored

    def abort(self) -> None:
        """Drop what was written (a refused or broken upload)."""
        try:
            self._file.close()
        finally:
            data = self._store._data(self._id)
            if data.exists():
                data.fs.rm(data.path)


class FileStore:
    def __init__(self, root: DataRoot) -> None:
        self._root = root

    def _data(self, file_id: str) -> BatchPath:
        if not _FILE_ID.match(file_id):
            raise BatchNotFoundError(f"no file with id {file_id!r}")
        return self._root.internal(FILES_FOLDER, file_id)

    def _meta(self, file_id: str) -> BatchPath:
        return self._root.internal(FILES_FOLDER, f"{file_id}{META_SUFFIX}")

    def create(self, filename: str) -> FileWriter:
        """A writer for a new file (its id is chosen here)."""
        if not filename or len(filename) > MAX_FILENAME_CHARS:
            raise InvalidRequestError(f"file: a filename of 1 to {MAX_FILENAME_CHARS} characters is required")
        return FileWriter(self, f"file-{uuid.uuid4().hex}", filename)

    def put(self, content: bytes, filename: str, purpose: str) -> StoredFile:
        writer = self.create(filename)
        try:
            writer.write(content)
        except BaseException:
            writer.abort()
            raise
        return writer.commit(purpose)

    def get(self, file_id: str) -> StoredFile:
        meta = self._meta(self._data(file_id).path.rsplit("/", 1)[-1])
        try:
            raw = meta.read_bytes()
        except FileNotFoundError:
            raise BatchNotFoundError(f"no file with id {file_id!r}") from None
        stored = _parse(file_id, raw)
        if stored is None:
            raise BatchNotFoundError(f"no file with id {file_id!r} (its metadata is unreadable)")
        return stored

    def content(self, file_id: str) -> bytes:
        self.get(file_id)
        return self._data(file_id).read_bytes()

    def chunks(self, file_id: str) -> Iterator[bytes]:
        """The file's bytes in chunks of READ_CHUNK_BYTES at most (each `next` blocks: run it in a thread)."""
        self.get(file_id)
        data = self._data(file_id)
        with data.fs.open(data.path, "rb") as f:
            while chunk := f.read(READ_CHUNK_BYTES):
                yield chunk

    def head(self, file_id: str, max_bytes: int) -> bytes:
        """At most the first `max_bytes` of the file."""
        self.get(file_id)
        data = self._data(file_id)
        with data.fs.open(data.path, "rb") as f:
            return f.read(max_bytes)

    def path_of(self, file_id: str) -> BatchPath:
        """Where a stored file's bytes are (a job reads its input file there)."""
        self.get(file_id)
        return self._data(file_id)

    def delete(self, file_id: str) -> None:
        self.get(file_id)
        for location in (self._meta(file_id), self._data(file_id)):  # unlisted first
            location.fs.rm(location.path)

    def list(self, purpose: str | None = None) -> list[StoredFile]:
        """Every complete file; anything else in the folder is skipped (logged)."""
        folder = self._root.internal(FILES_FOLDER)
        if not folder.exists():
            return []
        files = []
        for name in (p.rsplit("/", 1)[-1] for p in folder.fs.ls(folder.path, detail=False)):
            file_id = name.removesuffix(META_SUFFIX)
            if name == file_id or not _FILE_ID.match(file_id):
                continue  # the bytes of a file, a partial upload or a stray file: not a file's metadata
            try:
                stored = _parse(file_id, self._meta(file_id).read_bytes())
            except OSError as exc:  # removed meanwhile, or unreadable
                logger.warning("file store: %s is unreadable, skipped: %s", name, exc)
                continue
            if stored is not None and (purpose is None or stored.purpose == purpose):
                files.append(stored)
        return sorted(files, key=lambda f: (f.created_at, f.id), reverse=True)


def _parse(file_id: str, raw: bytes) -> StoredFile | None:
    """The metadata in `raw` (extra keys ignored); None, logged, if it is not a file's metadata."""
    try:
        data: Any = json.loads(raw)
        stored = StoredFile(**{name: data[name] for name in _FIELDS})
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("file store: the metadata of %s is unreadable, skipped: %s", file_id, exc)
        return None
    if stored.id != file_id or not isinstance(stored.bytes, int):
        logger.warning("file store: the metadata of %s does not describe it, skipped", file_id)
        return None
    return stored
