"""POST /v1/files as a stream: the multipart body is parsed as it arrives (python-multipart) and the file
part goes to the file store in chunks of at most `UPLOAD_CHUNK_BYTES`, each written from a thread.

An upload holds at most one chunk of its body in memory, and no file I/O runs on the ingress's event
loop. `UploadSlots` bounds the uploads in progress per ingress replica (429 past it, before the body is
read); the request guard counts the body against `batch.max_upload_bytes` (413) as it streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from deployments.batch.config import BatchSettings
from deployments.batch.files import FileStore, FileWriter, StoredFile
from deployments.batch.types import TooManyUploadsError
from engine.errors import InvalidRequestError

UPLOAD_CHUNK_BYTES = 1024 * 1024  # the most of one upload's body held in memory at once
PARSE_BYTES = 256 * 1024  # the body's bytes handed to the parser's thread at a time
MAX_FIELD_BYTES = 1024  # a form field other than the file (`purpose`)
FILE_FIELD = "file"
PURPOSES = ("batch", "fine-tune", "user_data")


def upload_description(settings: BatchSettings) -> str:
    """POST /v1/files's description in the published schema, with the bounds `settings` enforce."""
    return (
        "Upload one file (multipart/form-data: `file`, optional `purpose`). The body streams to the batch "
        f"data root's files/ folder; an upload holds at most {UPLOAD_CHUNK_BYTES} bytes of it in memory. "
        f"At most {settings.max_concurrent_uploads} uploads run at once per ingress replica "
        "(batch.max_concurrent_uploads): past it, 429 at once. A body over "
        f"{settings.max_upload_bytes} bytes (batch.max_upload_bytes) is refused with 413."
    )


@dataclass(slots=True)
class UploadSlots:
    """At most `limit` uploads at once (one ingress replica); past it, 429 at once."""

    limit: int
    num_active: int = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.num_active >= self.limit:
            raise TooManyUploadsError(
                f"{self.num_active} uploads are in progress, the most this server takes at once "
                f"(batch.max_concurrent_uploads={self.limit}); retry when one has finished"
            )
        self.num_active += 1
        try:
            yield
        finally:
            self.num_active -= 1


@dataclass(slots=True)
class _Form:
    """What python-multipart's callbacks found so far: small fields, and the file part as events."""

    fields: dict[str, str] = field(default_factory=dict)
    events: list[tuple[str, bytes]] = field(default_factory=list)  # ("open", filename) / ("data", bytes)
    is_ended: bool = False
    num_files: int = 0
    _header_name: bytes = b""
    _header_value: bytes = b""
    _disposition: bytes = b""
    _name: str = ""
    _is_file: bool = False
    _value: bytearray = field(default_factory=bytearray)

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._add_header(name=data[start:end]),
            "on_header_value": lambda data, start, end: self._add_header(value=data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._name, self._is_file, self._value = b"", "", False, bytearray()

    def _add_header(self, name: bytes = b"", value: bytes = b"") -> None:
        self._header_name += name
        self._header_value += value

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise InvalidRequestError("file: every multipart part needs a Content-Disposition name")
        self._name = options[b"name"].decode("utf-8", errors="replace")
        self._is_file = self._name == FILE_FIELD
        if self._is_file:
            self.num_files += 1
            if self.num_files > 1:
                raise InvalidRequestError("file: send one file per upload")
            self.events.append(("open", options.get(b"filename", b"upload")))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.events.append(("data", data[start:end]))
        elif len(self._value) + end - start > MAX_FIELD_BYTES:
            raise InvalidRequestError(f"{self._name}: a form field holds at most {MAX_FIELD_BYTES} bytes")
        else:
            self._value += data[start:end]

    def _part_end(self) -> None:
        if not self._is_file:
            self.fields[self._name] = self._value.decode("utf-8", errors="replace")

    def _end(self) -> None:
        self.is_ended = True

    def take_events(self) -> list[tuple[str, bytes]]:
        events, self.events = self.events, []
        return events


async def receive_upload(content_type: str, stream: AsyncIterator[bytes], store: FileStore) -> StoredFile:
    """Parse the multipart body from `stream` and write its `file` part to `store`; 400 when malformed.
    The body is parsed in worker threads, `PARSE_BYTES` at a time (the pure-Python parser was an eighth
    of the ingress loop's time during uploads), and written from threads `UPLOAD_CHUNK_BYTES` at a time."""
    parser, form = _parser(content_type)
    writer: FileWriter | None = None
    pieces: list[bytes] = []  # the file's bytes parsed since the last write: at most about one chunk
    num_pending = 0
    raw: list[bytes] = []  # the body's bytes received since the last parse: at most about PARSE_BYTES
    num_raw = 0

    async def parse_and_write(final: bool) -> None:
        nonlocal writer, pieces, num_pending, raw, num_raw
        events = await asyncio.to_thread(_parse, parser, form, raw)
        raw, num_raw = [], 0
        for kind, data in events:
            if kind == "open":
                writer = await asyncio.to_thread(store.create, data.decode("utf-8", errors="replace"))
                continue
            pieces.append(data)
            num_pending += len(data)
        if num_pending >= UPLOAD_CHUNK_BYTES or (final and pieces and writer is not None):
            await asyncio.to_thread(writer.write_pieces, pieces)
            pieces, num_pending = [], 0

    try:
        async for chunk in stream:
            raw.append(chunk)
            num_raw += len(chunk)
            if num_raw >= PARSE_BYTES:
                await parse_and_write(final=False)
        await parse_and_write(final=True)
        purpose = _check_form(form, writer)
        return await asyncio.to_thread(writer.commit, purpose)
    except BaseException as exc:
        if writer is not None:
            await asyncio.shield(asyncio.to_thread(writer.abort))
        if isinstance(exc, ClientDisconnect):  # nobody hears the answer; the log says what happened
            raise InvalidRequestError("file: the client went away before the upload ended") from None
        raise


def _parse(parser: MultipartParser, form: _Form, raw: list[bytes]) -> list[tuple[str, bytes]]:
    """Feed `raw` to the parser (in a worker thread); the events it produced."""
    try:
        for chunk in raw:
            parser.write(chunk)
    except FormParserError as exc:
        raise InvalidRequestError(f"file: the body is not valid multipart/form-data: {exc}") from None
    return form.take_events()


def _parser(content_type: str) -> tuple[MultipartParser, _Form]:
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequestError(
            f"file: send the file as multipart/form-data with a boundary (Content-Type was {content_type!r})"
        )
    form = _Form()
    return MultipartParser(options[b"boundary"], form.callbacks()), form


def _check_form(form: _Form, writer: FileWriter | None) -> str:
    if not form.is_ended:
        raise InvalidRequestError("file: the multipart body ended before its closing boundary")
    if writer is None:
        raise InvalidRequestError(f"file: a multipart part named {FILE_FIELD!r} with the file is required")
    purpose = form.fields.get("purpose", "batch")
    if purpose not in PURPOSES:
        raise InvalidRequestError(f"purpose: one of {', '.join(PURPOSES)} is expected, got {purpose!r}")
    return purpose
