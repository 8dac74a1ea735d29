"""Paths under the configured data root, read and written through fsspec (local, file://, s3://...).

Every user-given path goes through `DataRoot.resolve`: relative paths are taken under the root; absolute
paths and URLs must lie inside it. `..` segments, local symlinks that lead out and the server's own
folders under the root (`RESERVED_FOLDERS`: uploaded files, job parts, job records) are refused (400).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from engine.errors import InvalidRequestError

FILES_FOLDER = "files"  # uploaded and produced files (deployments/batch/files.py)
JOBS_FOLDER = "jobs"  # OpenAI batches' parts (deployments/batch/outputs.py)
STATE_FOLDER = "state"  # job records (deployments/batch/registry.py, a RecordStore)
RESERVED_FOLDERS = (FILES_FOLDER, JOBS_FOLDER, STATE_FOLDER)


def root_key(root: str) -> str:
    """The data root in one spelling (a local folder's real path): two spellings, one root."""
    if "://" not in root or root.startswith("file://"):
        return os.path.realpath(os.path.expanduser(root.removeprefix("file://")))
    return root.rstrip("/")


@dataclass(frozen=True, slots=True)
class BatchPath:
    """A checked location: the filesystem and the path on it; `url` is what clients see."""

    fs: Any  # fsspec.AbstractFileSystem
    path: str
    url: str

    def read_bytes(self) -> bytes:
        with self.fs.open(self.path, "rb") as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        with self.fs.open(self.path, "wb") as f:
            f.write(data)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def child(self, name: str) -> BatchPath:
        return BatchPath(self.fs, posixpath.join(self.path, name), posixpath.join(self.url, name))


class DataRoot:
    """The one folder (or bucket prefix) batch jobs may touch."""

    def __init__(self, root: str) -> None:
        self._is_local = "://" not in root or root.startswith("file://")
        if self._is_local:
            local = os.path.realpath(os.path.expanduser(root.removeprefix("file://")))
            os.makedirs(local, exist_ok=True)
            self._fs, self._root = fsspec.filesystem("file"), local
        else:
            self._fs, path = url_to_fs(root)
            self._root = path.rstrip("/")
        self._protocol = root.split("://", 1)[0] if "://" in root else "file"
        self.url = root

    def resolve(self, given: str, *, field: str, is_internal: bool = False) -> BatchPath:
        """The location `given` names, or InvalidRequestError (400) naming `field` when it is outside the
        root or, unless `is_internal` (a path the server chose), inside one of its reserved folders."""
        if not given or "\x00" in given:
            raise InvalidRequestError(f"{field}: a path is required")
        try:
            given.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(f"{field}: the path is not valid UTF-8 text") from None
        if ".." in given.replace("\\", "/").split("/"):
            raise InvalidRequestError(f"{field}: '..' is not allowed in batch paths ({given!r})")
        path = self._local_path(given, field) if self._is_local else self._remote_path(given, field)
        if not is_internal:
            self._check_not_reserved(path, given, field)
        return BatchPath(self._fs, path, self._display(path))

    def _check_not_reserved(self, path: str, given: str, field: str) -> None:
        sep = os.sep if self._is_local else "/"
        first = path[len(self._root) :].lstrip(sep).split(sep, 1)[0]
        if first in RESERVED_FOLDERS:
            raise InvalidRequestError(
                f"{field}: {given!r} lies in {first}/, a folder the server keeps for itself under the batch "
                f"data root (its own folders: {', '.join(f + '/' for f in RESERVED_FOLDERS)}); "
                "name a path elsewhere under the root"
            )

    def _local_path(self, given: str, field: str) -> str:
        if "://" in given and not given.startswith("file://"):
            raise InvalidRequestError(f"{field}: {given!r} is not under the batch data root {self.url}")
        raw = given.removeprefix("file://")
        joined = raw if os.path.isabs(raw) else os.path.join(self._root, raw)
        real = os.path.realpath(joined)  # follows symlinks, so a link that leads out is caught here
        if real != self._root and not real.startswith(self._root + os.sep):
            raise InvalidRequestError(
                f"{field}: {given!r} is outside the batch data root {self._root} (batch.data_root)"
            )
        return real

    def _remote_path(self, given: str, field: str) -> str:
        if "://" in given:
            if given.partition("://")[0] != self._protocol:
                raise InvalidRequestError(f"{field}: {given!r} is not under the batch data root {self.url}")
            path = posixpath.normpath(self._fs._strip_protocol(given))  # the filesystem's own path form
        else:
            path = posixpath.normpath(posixpath.join(self._root, given))
        if path != self._root and not path.startswith(self._root + "/"):
            raise InvalidRequestError(f"{field}: {given!r} is outside the batch data root {self.url}")
        return path

    def _display(self, path: str) -> str:
        return path if self._is_local else self._fs.unstrip_protocol(path)

    def internal(self, *parts: str) -> BatchPath:
        """A server-chosen location under the root (uploaded files, job parts); never user input."""
        path = posixpath.join(self._root, *parts)
        return BatchPath(self._fs, path, self._display(path))
