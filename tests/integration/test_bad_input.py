"""Bad input on every route of the real app: a 4xx with a readable message, never a 5xx, never a crash.

The matrix ends by checking that the same model replica (its pid, asked through a Serve handle) still
serves: no input may take the replica down and have Serve quietly replace it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from deployments.app import build_app_from_configs
from deployments.config import DeploymentSettings, EngineSettings, ModelConfig
from deployments.limits import LimitSettings
from deployments.protocol.bounds import MAX_NEW_TOKENS_MAX, MAX_STOP_SEQUENCES, SEED_MAX, SEED_MIN, TOP_K_MAX
from tests.integration.tiny_app import TINY_MODEL
from tests.serve_fixtures import delete_app, replica_pid, run_app

LIMITS = LimitSettings()  # the tiny app runs with the default limits
SYNC, STREAM = "v1/llm/completions-sync", "v1/llm/completions-stream"
COMPLETIONS, CHAT = "v1/completions", "v1/chat/completions"
HUGE_BODY_BYTES = 20 * 1024**2


@dataclass(frozen=True, slots=True)
class Case:
    """One bad request: route, body (a dict merged into a good one, or raw bytes) and the expected answer."""

    route: str
    status: int
    detail: str  # a substring of the message
    changes: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()
    raw: bytes | None = None
    params: dict[str, str] | None = None  # None: model_endpoint_name=tiny on the LLM Engine routes
    is_chunked: bool = False

    def body(self) -> dict[str, Any]:
        if self.route in (SYNC, STREAM):
            good = {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}
        elif self.route == COMPLETIONS:
            good = {"model": TINY_MODEL, "prompt": "Hello", "max_tokens": 4}
        else:
            good = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        return {k: v for k, v in {**good, **self.changes}.items() if k not in self.drop}


def llm(status: int, detail: str, route: str = SYNC, **kwargs: Any) -> Case:
    return Case(route, status, detail, **kwargs)


def huge(route: str, is_chunked: bool = False) -> Case:
    return Case(route, 413, "limits.max_body_bytes", raw=b"x" * HUGE_BODY_BYTES, is_chunked=is_chunked)


NAN_BODY = b'{"prompt": "Hello", "max_new_tokens": 4, "temperature": NaN}'
TOO_MANY_STOPS = [f"s{i}" for i in range(LIMITS.max_stop_sequences + 1)]
TOO_LONG_STOP = "x" * (LIMITS.max_stop_sequence_chars + 1)
LONG_TEXT = "hello " * 400  # ~400+ tokens: past the tiny model's 256-token context

CASES: dict[str, Case] = {
    # ---- LLM Engine v1 ----
    "malformed-json": llm(400, "malformed JSON", raw=b'{"prompt": "x",'),
    "json-array": llm(400, "JSON object", raw=b"[1, 2]"),
    "json-string": llm(400, "JSON object", raw=b'"hello"'),
    "empty-body": llm(400, "body is missing", raw=b""),
    "missing-prompt": llm(400, "prompt", drop=("prompt",)),
    "null-prompt": llm(400, "prompt", changes={"prompt": None}),
    "int-prompt": llm(400, "prompt", changes={"prompt": 5}),
    "missing-max-new-tokens": llm(400, "max_new_tokens", drop=("max_new_tokens",)),
    "max-new-tokens-0": llm(400, "max_new_tokens", changes={"max_new_tokens": 0}),
    "max-new-tokens-negative": llm(400, "max_new_tokens", changes={"max_new_tokens": -5}),
    "max-new-tokens-float": llm(400, "max_new_tokens", changes={"max_new_tokens": 2.5}),
    "max-new-tokens-string": llm(400, "max_new_tokens", changes={"max_new_tokens": "ten"}),
    "max-new-tokens-1e12": llm(400, "max_new_tokens: Input should be", changes={"max_new_tokens": 1e12}),
    "temperature-negative": llm(400, "temperature", changes={"temperature": -0.5}),
    "temperature-above-1": llm(400, "temperature", changes={"temperature": 1.5}),
    "temperature-nan": llm(400, "temperature", raw=NAN_BODY),
    "temperature-infinity": llm(400, "temperature", raw=NAN_BODY.replace(b"NaN", b"Infinity")),
    "temperature-string": llm(400, "temperature", changes={"temperature": "hot"}),
    "top-p-0": llm(400, "top_p", changes={"temperature": 0.5, "top_p": 0}),
    "top-p-above-1": llm(400, "top_p", changes={"temperature": 0.5, "top_p": 1.5}),
    "top-k-0": llm(400, "top_k", changes={"temperature": 0.5, "top_k": 0}),
    "top-k-minus-2": llm(400, "top_k", changes={"temperature": 0.5, "top_k": -2}),
    "presence-penalty-negative": llm(400, "presence_penalty", changes={"presence_penalty": -1}),
    "frequency-penalty-3": llm(400, "frequency_penalty", changes={"frequency_penalty": 3}),
    "stop-sequences-string": llm(400, "stop_sequences", changes={"stop_sequences": "stop"}),
    "stop-sequences-ints": llm(400, "stop_sequences", changes={"stop_sequences": [1, 2]}),
    "log-probs-wrong-type": llm(400, "return_token_log_probs", changes={"return_token_log_probs": "maybe"}),
    "two-guided-fields": llm(400, "Only one of", changes={"guided_regex": "a+", "guided_choice": ["a", "b"]}),
    "prompt-past-context": llm(400, "exceeds this model's context", changes={"prompt": LONG_TEXT}),
    "prompt-past-max-chars": llm(
        400, "limits.max_prompt_chars", changes={"prompt": "x" * (LIMITS.max_prompt_chars + 1)}
    ),
    "too-many-stops": llm(400, "limits.max_stop_sequences", changes={"stop_sequences": TOO_MANY_STOPS}),
    "too-long-stop": llm(400, "limits.max_stop_sequence_chars", changes={"stop_sequences": [TOO_LONG_STOP]}),
    "huge-body": huge(SYNC),
    "huge-body-chunked": huge(SYNC, is_chunked=True),
    "missing-model-endpoint-name": llm(400, "model_endpoint_name", params={}),
    "empty-model-endpoint-name": llm(400, "model_endpoint_name", params={"model_endpoint_name": ""}),
    "unknown-model": llm(404, TINY_MODEL, params={"model_endpoint_name": "nope"}),
    "stream-malformed-json": llm(400, "malformed JSON", route=STREAM, raw=b"{"),
    "stream-temperature-nan": llm(400, "temperature", route=STREAM, raw=NAN_BODY),
    "stream-unknown-model": llm(404, TINY_MODEL, route=STREAM, params={"model_endpoint_name": "nope"}),
    "stream-prompt-past-context": llm(400, "context", route=STREAM, changes={"prompt": LONG_TEXT}),
    "stream-too-many-stops": llm(
        400, "limits.max_stop_sequences", route=STREAM, changes={"stop_sequences": TOO_MANY_STOPS}
    ),
    "stream-huge-body": huge(STREAM),
    # ---- OpenAI /v1/completions ----
    "openai-malformed-json": Case(COMPLETIONS, 400, "malformed JSON", raw=b"{]"),
    "openai-json-array": Case(COMPLETIONS, 400, "JSON object", raw=b"[]"),
    "openai-missing-model": Case(COMPLETIONS, 400, "model", drop=("model",)),
    "openai-empty-model": Case(COMPLETIONS, 400, "model", changes={"model": ""}),
    "openai-unknown-model": Case(COMPLETIONS, 404, TINY_MODEL, changes={"model": "nope"}),
    "openai-null-prompt": Case(COMPLETIONS, 400, "prompt", changes={"prompt": None}),
    "openai-token-prompt": Case(COMPLETIONS, 400, "token id prompts", changes={"prompt": [[1, 2]]}),
    "openai-max-tokens-0": Case(COMPLETIONS, 400, "max_tokens", changes={"max_tokens": 0}),
    "openai-max-tokens-1e12": Case(
        COMPLETIONS, 400, "max_tokens: Input should", changes={"max_tokens": 10**12}
    ),
    "openai-temperature-above-2": Case(COMPLETIONS, 400, "temperature", changes={"temperature": 2.5}),
    "openai-temperature-nan": Case(
        COMPLETIONS, 400, "temperature", raw=b'{"model": "tiny", "prompt": "x", "temperature": NaN}'
    ),
    "openai-top-p-0": Case(COMPLETIONS, 400, "top_p", changes={"top_p": 0}),
    "openai-top-k-minus-2": Case(COMPLETIONS, 400, "top_k", changes={"top_k": -2}),
    "openai-presence-penalty-3": Case(COMPLETIONS, 400, "presence_penalty", changes={"presence_penalty": 3}),
    "openai-n-2": Case(COMPLETIONS, 400, "n=1", changes={"n": 2}),
    "openai-stop-ints": Case(COMPLETIONS, 400, "stop", changes={"stop": [1]}),
    "openai-too-many-stops": Case(
        COMPLETIONS, 400, "limits.max_stop_sequences", changes={"stop": TOO_MANY_STOPS}
    ),
    "openai-prompt-past-context": Case(COMPLETIONS, 400, "context", changes={"prompt": LONG_TEXT}),
    "openai-stream-past-context": Case(
        COMPLETIONS, 400, "context", changes={"prompt": LONG_TEXT, "stream": True}
    ),
    "openai-huge-body": huge(COMPLETIONS),
    # ---- OpenAI /v1/chat/completions ----
    "chat-unknown-role": Case(CHAT, 400, "role", changes={"messages": [{"role": "wizard", "content": "Hi"}]}),
    "chat-no-messages": Case(CHAT, 400, "messages", changes={"messages": []}),
    "chat-missing-messages": Case(CHAT, 400, "messages", drop=("messages",)),
    "chat-int-content": Case(CHAT, 400, "content", changes={"messages": [{"role": "user", "content": 3}]}),
    "chat-image-part": Case(
        CHAT,
        400,
        "only 'text'",
        changes={"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    ),
    "chat-unknown-model": Case(CHAT, 404, TINY_MODEL, changes={"model": "nope"}),
    "chat-max-tokens-negative": Case(CHAT, 400, "max_tokens", changes={"max_tokens": -1}),
    "chat-frequency-penalty-5": Case(CHAT, 400, "frequency_penalty", changes={"frequency_penalty": 5}),
    "chat-too-long-stop": Case(CHAT, 400, "limits.max_stop_sequence_chars", changes={"stop": TOO_LONG_STOP}),
    "chat-past-context": Case(
        CHAT, 400, "context", changes={"messages": [{"role": "user", "content": LONG_TEXT}]}
    ),
    "chat-stream-options-without-stream": Case(
        CHAT, 400, "stream_options", changes={"stream_options": {"include_usage": True}}
    ),
    "chat-huge-body": huge(CHAT),
    "chat-top-logprobs-21": Case(CHAT, 400, "top_logprobs", changes={"logprobs": True, "top_logprobs": 21}),
    "openai-logprobs-6": Case(COMPLETIONS, 400, "logprobs", changes={"logprobs": 6}),
    "llm-guided-json-surrogate-key": llm(
        400, "guided_json: is not valid Unicode", changes={"guided_json": {"properties": {"\ud800": {}}}}
    ),
    "openai-guided-json-escaped-surrogate": Case(
        COMPLETIONS, 400, "guided_json: is not valid Unicode", changes={"guided_json": '{"const": "\\ud800"}'}
    ),
    "chat-schema-surrogate": Case(
        CHAT,
        400,
        "response_format.json_schema.schema: is not valid Unicode",
        changes={"response_format": {"type": "json_schema", "json_schema": {"schema": {"const": "\udc00"}}}},
    ),
}
ROUTES = {"llm": SYNC, "llm-stream": STREAM, "openai": COMPLETIONS, "chat": CHAT}


def prompt_field(route: str) -> str:
    return "messages.0.content" if route == CHAT else "prompt"


def prompt_change(route: str, text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]} if route == CHAT else {"prompt": text}


def names(route: str) -> tuple[str, str]:
    """(max tokens, stop strings) as the route's protocol names them."""
    return ("max_new_tokens", "stop_sequences") if route in (SYNC, STREAM) else ("max_tokens", "stop")


def issue_11_cases(tag: str, route: str) -> dict[str, Case]:
    """The issue's one-number-takes-a-model-down inputs and their relatives, on one route."""
    max_tokens, stop = names(route)
    sampled = {"temperature": 0.5}
    most = "Input should be less than or equal to"
    cases = {
        "seed-2**64": (f"seed: {most} {SEED_MAX}", {**sampled, "seed": 2**64}),
        "seed-below-int64": (
            f"seed: Input should be greater than or equal to {SEED_MIN}",
            {**sampled, "seed": SEED_MIN - 1},
        ),
        "top-k-2**63": (f"top_k: {most} {TOP_K_MAX}", {**sampled, "top_k": 2**63}),
        "lone-surrogate-prompt": (
            f"{prompt_field(route)}: is not valid Unicode",
            prompt_change(route, "\ud800 hi"),
        ),
        "lone-surrogate-stop": (f"{stop}.1: is not valid Unicode", {stop: ["ok", "\udc00"]}),
        "max-tokens-past-static-bound": (
            f"{max_tokens}: {most} {MAX_NEW_TOKENS_MAX}",
            {max_tokens: MAX_NEW_TOKENS_MAX + 1},
        ),
        "max-tokens-past-context": ("exceeds this model's context", {max_tokens: MAX_NEW_TOKENS_MAX}),
        "stops-past-static-bound": (
            f"{stop}: List should have at most {MAX_STOP_SEQUENCES}",
            {stop: ["s"] * (MAX_STOP_SEQUENCES + 1)},
        ),
        "stops-past-limit": ("limits.max_stop_sequences", {stop: TOO_MANY_STOPS}),
    }
    return {
        f"{tag}-{name}": Case(route, 400, detail, changes=changes)
        for name, (detail, changes) in cases.items()
    }


for _tag, _route in ROUTES.items():
    CASES.update(issue_11_cases(_tag, _route))


def send(client: httpx.Client, case: Case) -> httpx.Response:
    params = case.params
    if params is None:
        params = {"model_endpoint_name": TINY_MODEL} if case.route in (SYNC, STREAM) else {}
    content = case.raw if case.raw is not None else json.dumps(case.body()).encode()
    if case.is_chunked:  # no Content-Length: the server must count the bytes as they stream in
        content = iter([content[i : i + 1024**2] for i in range(0, len(content), 1024**2)])
    headers = {"content-type": "application/json"}
    return client.post(case.route, params=params, content=content, headers=headers)


def message_of(response: httpx.Response, route: str) -> str:
    body = response.json()
    if route in (COMPLETIONS, CHAT):
        assert body["error"]["code"] == response.status_code, body
        return body["error"]["message"]
    return body["detail"]


@pytest.fixture(scope="module")
def client(tiny_app_url: str):
    with httpx.Client(base_url=tiny_app_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def pid_before(client: httpx.Client) -> int:
    """Asked before the first bad request of this module."""
    return replica_pid("tiny", TINY_MODEL)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_input_is_a_clear_4xx(client: httpx.Client, pid_before: int, case: Case):
    try:
        response = send(client, case)
    except httpx.WriteError:  # the server may answer 413 and close before a huge upload is sent
        assert case.status == 413
        return
    assert response.status_code == case.status, response.text[:500]
    message = message_of(response, case.route)
    assert case.detail in message, message
    assert "Traceback" not in message and len(message) < 2000


def body_of(route: str, **changes: Any) -> dict[str, Any]:
    return Case(route, 200, "", changes=changes).body()


def answer_text(response: httpx.Response, route: str) -> str:
    """The generated text of a 200, from a JSON body or from the stream's events."""
    assert response.status_code == 200, response.text[:500]
    if route == STREAM:
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        assert events[-1]["output"]["finished"], events[-1]
        return "".join(e["output"]["text"] for e in events)
    body = response.json()
    if route == SYNC:
        return body["output"]["text"]
    choice = body["choices"][0]
    return choice["message"]["content"] if route == CHAT else choice["text"]


@pytest.mark.parametrize("temperature", [1e-46, 1e-40, 9e-6])
@pytest.mark.parametrize("route", ROUTES.values(), ids=ROUTES.keys())
def test_temperatures_below_the_epsilon_are_greedy(client: httpx.Client, route: str, temperature: float):
    """Documented clamp: below 1e-5 a temperature is greedy (1e-46 is 0 in float32, 1e-40 subnormal)."""
    params = {"model_endpoint_name": TINY_MODEL} if route in (SYNC, STREAM) else {}
    greedy = client.post(route, params=params, json=body_of(route, temperature=0))
    tiny = client.post(route, params=params, json=body_of(route, temperature=temperature, seed=1))
    assert answer_text(tiny, route) == answer_text(greedy, route)


GEMMA_STYLE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def template_app_url(serve_port: int, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny model with a chat template that raises on a system turn, as Gemma's does."""
    model_dir = tmp_path_factory.mktemp("gemma_style") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "chat_template.jinja").write_text(GEMMA_STYLE_TEMPLATE)
    model = ModelConfig(
        name="strict",
        model=str(model_dir),
        use_chat_template=True,
        engine=EngineSettings(dtype="float32", max_model_len=64, kv_cache_bytes=4 * 1024**2, num_threads=1),
        deployment=DeploymentSettings(ray_actor_options={"num_cpus": 0.2}),
    )
    yield run_app(build_app_from_configs([model]), name="strict", route_prefix="/strict", port=serve_port)
    delete_app("strict")


@pytest.mark.parametrize("route", [CHAT, "v2/chat/completions"])
def test_a_chat_template_error_is_a_400_and_the_replica_stays(template_app_url: str, route: str):
    pid = replica_pid("strict", "strict")
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hi"}]
    body = {"model": "strict", "messages": system, "max_tokens": 2}
    for stream in (False, True):
        refused = httpx.post(template_app_url + route, json={**body, "stream": stream}, timeout=60)
        assert refused.status_code == 400, refused.text
        message = refused.json()["error"]["message"]
        assert "chat template of model strict refused" in message and "System role not supported" in message
    answered = httpx.post(template_app_url + route, json={**body, "messages": system[1:]}, timeout=60)
    assert answered.status_code == 200, answered.text
    assert replica_pid("strict", "strict") == pid


def test_the_server_still_answers_after_the_matrix(client: httpx.Client, pid_before: int):
    for route, body in [
        (SYNC, {"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}),
        (COMPLETIONS, {"model": TINY_MODEL, "prompt": "Hello", "max_tokens": 4}),
    ]:
        response = client.post(route, params={"model_endpoint_name": TINY_MODEL}, json=body)
        assert response.status_code == 200, response.text
    assert client.get("readyz").status_code == 200
    assert replica_pid("tiny", TINY_MODEL) == pid_before  # the same replica: nothing took it down
