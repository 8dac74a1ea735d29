"""Server-sent events framing: `data: <one-line JSON>` and a blank line per event; nothing else."""

from pydantic import BaseModel

SSE_MEDIA_TYPE = "text/event-stream"
# Proxies (nginx) buffer responses unless told not to; events must leave as they are made.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: BaseModel) -> bytes:
    """One event. `model_dump_json` never emits a newline, so the event stays on one line."""
    return b"data: " + payload.model_dump_json().encode("utf-8") + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"  # OpenAI's end of stream
