"""What each serving layer costs: the OpenAI completions stream served from the process that holds the
engine, without the product's ingress hop. A measuring tool for `serve_bench.py --compare-engine`, not a
way to run the product (no API keys, no limits, no other routes, one model).

Two rungs below the product (`serve run serve_config.yaml`: HAProxy -> Ingress -> ModelServer):

    python benchmarks/direct_http.py              # bare uvicorn in this process, no Ray at all
    RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 \\
      RAY_SERVE_HAPROXY_BINARY_PATH=$(command -v llmserve-haproxy) \\
      python benchmarks/direct_http.py --serve    # one Serve deployment that answers HTTP itself
    python benchmarks/serve_bench.py --api openai --compare-engine --rounds 2 --concurrency 16 32 \\
      --num-requests 64

Both serve POST /v1/completions (streamed) and GET /readyz on port 8000 with the product's own
pieces: its request model, `ModelServer` (engine, tokenizer, stream coalescing) and its OpenAI event
builders. The Serve rung keeps one replica (autoscaling off), as the product's 2-CPU machine can place
only one.
docs/performance.md, "The serving ladder", has what they measured.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from deployments.config import load_model_config
from deployments.ingress import openai_sse_chunk
from deployments.model_server import EngineFactory, ModelServer
from deployments.protocol.openai import CompletionRequest
from deployments.protocol.openai_responses import CompletionChunks
from deployments.sse import SSE_DONE, SSE_HEADERS, SSE_MEDIA_TYPE
from deployments.wire import ModelRequest


class DirectServer(ModelServer):
    """A model replica that answers the OpenAI stream itself: the tokens never leave its process
    before they become HTTP."""

    def __init__(self, model_config_path: str, engine_factory: EngineFactory | None = None) -> None:
        super().__init__(load_model_config(model_config_path), engine_factory)

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET" and request.url.path == "/readyz":  # serve_bench waits for it
            return JSONResponse({"status": "ready"})  # the engine loaded before this replica answered
        if request.method != "POST" or request.url.path != "/v1/completions":
            return JSONResponse({"error": "only POST /v1/completions is served here"}, status_code=404)
        body = CompletionRequest.model_validate_json(await request.body())
        if not body.stream:
            return JSONResponse({"error": "only streams are served here"}, status_code=400)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        model_request = ModelRequest(request_id, body.prompt, body.to_sampling_params(), is_raw_prompt=True)
        chunks = CompletionChunks(request_id, created, body.model)
        events = self._events(model_request, chunks, body.is_usage_streamed)
        return StreamingResponse(events, media_type=SSE_MEDIA_TYPE, headers=SSE_HEADERS)

    async def _events(
        self, request: ModelRequest, chunks: CompletionChunks, is_usage_sent: bool
    ) -> AsyncIterator[bytes]:
        """The ingress's framing: one HTTP write per chunk of deltas, usage last, then `[DONE]`."""
        async for chunk in self.generate_stream(request):
            if events := openai_sse_chunk(chunk, chunks, is_usage_sent):
                yield events
        yield SSE_DONE


def asgi_app(server: DirectServer):
    """The server as a bare ASGI application (HTTP only)."""

    async def asgi(scope, receive, send) -> None:
        if scope["type"] == "http":
            response = await server(Request(scope, receive))
            await response(scope, receive, send)

    return asgi


def run_bare(model_config: str, port: int) -> None:
    import uvicorn

    uvicorn.run(asgi_app(DirectServer(model_config)), host="127.0.0.1", port=port, log_level="warning")


def run_serve(model_config: str, port: int) -> None:
    from ray import serve

    options = load_model_config(model_config).deployment.to_options()
    options.pop("autoscaling_config", None)
    options["num_replicas"] = 1
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve.deployment(DirectServer).options(name="DirectServer", **options).bind(model_config)
    serve.run(app, name="direct", route_prefix="/")
    print(f"serving on http://127.0.0.1:{port}/v1/completions; SIGTERM to stop", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-config", default="configs/smollm2-135m-instruct.yaml")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--serve", action="store_true", help="one Serve deployment instead of bare uvicorn")
    args = parser.parse_args()
    model_config = str(Path(args.model_config).resolve())  # the replica's working directory may differ
    (run_serve if args.serve else run_bare)(model_config, args.port)


if __name__ == "__main__":
    main()
