"""Paths under the configured data root, read and written through fsspec (local, file://, s3://...).

Every user-given path goes through `DataRoot.resolve`: relative paths are taken under the root; absolute
paths and URLs must lie inside it. `..` segments and local symlinks that lead out are refused (400).
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from engine.errors import InvalidRequestError


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

    def resolve(self, given: str, *, field: str) -> BatchPath:
        """The location `given` names, or InvalidRequestError (400) naming `field` when it is outside."""
        if not given or "\x00" in given:
            raise InvalidRequestError(f"{field}: a path is required")
        try:
            given.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError(f"{field}: the path is not valid UTF-8 text") from None
        if ".." in given.replace("\\", "/").split("/"):
            raise InvalidRequestError(f"{field}: '..' is not allowed in batch paths ({given!r})")
        path = self._local_path(given, field) if self._is_local else self._remote_path(given, field)
        return BatchPath(self._fs, path, self._display(path))

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
