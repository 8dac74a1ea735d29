"""Batch jobs on Ray Data with the real clients and the tiny real model: LLM Engine v1/v2 batch
completions, OpenAI Batch, Files; each job's outputs checked against the online answers.

One app of its own (the tiny model, a temporary batch data root, small Ray Data batches), next to the
shared tiny app in the same Ray instance. The jobs' lifecycle (queue, capacity, crashes, cancel, the
deadline, the registry's restarts) is tested on the fake engine: tests/deployments/test_batch_jobs.py.
"""

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import ray
from llmengine import Completion, File
from llmengine.data_types import (
    CreateBatchCompletionsModelConfig,
    CreateBatchCompletionsV1RequestContent,
    FilteredChatCompletionV2Request,
)

from deployments.app import build_app_from_configs
from deployments.batch.config import BatchSettings
from deployments.config import DeploymentSettings, EngineSettings, ModelConfig
from tests.integration.tiny_app import TINY_MAX_MODEL_LEN, TINY_MODEL
from tests.serve_fixtures import delete_app, run_app

APP_NAME, ROUTE = "batch", "/batch"
UPLOAD_LIMIT = 64 * 1024
PROMPTS = ["Hello", "The capital of France is", "Once upon a time", "Numbers: 1 2 3", "A café serves"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch_root")


@pytest.fixture(scope="module")
def batch_url(serve_port: int, tiny_model_dir: Path, data_root: Path) -> Iterator[str]:
    model = ModelConfig(
        name=TINY_MODEL,
        model=str(tiny_model_dir),
        engine=EngineSettings(
            dtype="float32", max_model_len=TINY_MAX_MODEL_LEN, kv_cache_bytes=16 * 1024**2, num_threads=1
        ),
        deployment=DeploymentSettings(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32),
    )
    settings = BatchSettings(
        data_root=str(data_root),
        max_upload_bytes=UPLOAD_LIMIT,
        max_data_parallelism=2,
        worker_num_cpus=0.5,
        batch_size=4,
        max_running_jobs=1,
    )
    yield run_app(
        build_app_from_configs([model], batch=settings), name=APP_NAME, route_prefix=ROUTE, port=serve_port
    )
    delete_app(APP_NAME)


@pytest.fixture(scope="module", autouse=True)
def base_path(batch_url: str) -> Iterator[None]:
    previous = os.environ.get("LLM_ENGINE_BASE_PATH")
    os.environ["LLM_ENGINE_BASE_PATH"] = batch_url
    yield
    if previous is None:
        del os.environ["LLM_ENGINE_BASE_PATH"]
    else:
        os.environ["LLM_ENGINE_BASE_PATH"] = previous


@pytest.fixture(scope="module")
def oai(batch_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{batch_url}v1", api_key="x", max_retries=0, timeout=60)


def wait_for(read: Callable[[], dict], is_done: Callable[[dict], bool], timeout_s: float = 180) -> dict:
    """Poll until `is_done` (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = read()
        if is_done(state) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def finished_job(job_id: str) -> dict:
    state = wait_for(
        lambda: Completion.get_batch_completion(job_id)["job"],
        lambda job: job["status"] in ("completed", "failed", "cancelled"),
    )
    return state


def online(prompt: str, max_new_tokens: int) -> dict:
    response = Completion.create(
        model=TINY_MODEL, prompt=prompt, max_new_tokens=max_new_tokens, temperature=0
    )
    return response.output.dict()


def test_v1_batch_outputs_match_online_answers_in_prompt_order(data_root: Path):
    too_long = "word " * TINY_MAX_MODEL_LEN  # fails alone: null in the list, its reason in the errors file
    response = Completion.batch_create(
        output_data_path="v1/out.json",
        model_config=CreateBatchCompletionsModelConfig(model=TINY_MODEL, checkpoint_path=None),
        content=CreateBatchCompletionsV1RequestContent(
            prompts=[*PROMPTS, too_long], max_new_tokens=6, temperature=0.0
        ),
    )
    job = finished_job(response.job_id)
    assert job["status"] == "completed", job
    assert job["progress"] == {
        "num_total": 6,
        "num_done": 6,
        "num_completed": 5,
        "num_failed": 1,
        "num_workers": 1,
    }
    outputs = json.loads((data_root / "v1/out.json").read_text())
    assert len(outputs) == len(PROMPTS) + 1 and outputs[-1] is None
    for prompt, output in zip(PROMPTS, outputs, strict=False):  # line by line: same text as online, greedy
        expected = online(prompt, 6)
        assert output == {**expected, "tokens": None}, prompt
    (error,) = [json.loads(x) for x in (data_root / "v1/out.json.errors.jsonl").read_text().splitlines()]
    assert error["index"] == 5 and error["status_code"] == 400 and "context" in error["error"], error
    assert list((data_root / "v1/out.json.parts").glob("part-*.jsonl"))  # Ray Data's batches, as parts


def test_v2_chat_batch_matches_openai_answers(data_root: Path, oai: openai.OpenAI):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    requests = [
        FilteredChatCompletionV2Request(messages=c, max_tokens=5, temperature=0) for c in conversations
    ]
    job = Completion.batch_create(
        output_data_path="v2/out.json",
        model_config=CreateBatchCompletionsModelConfig(model=TINY_MODEL),
        content=requests,
        use_v2=True,
        labels={"team": "tests"},
    )
    assert job.status in ("queued", "running") and job.model_config.model == TINY_MODEL
    state = finished_job(job.job_id)
    assert state["status"] == "completed" and state["metadata"]["team"] == "tests", state
    outputs = json.loads((data_root / "v2/out.json").read_text())
    for conversation, output in zip(conversations, outputs, strict=True):
        expected = oai.chat.completions.create(
            model=TINY_MODEL, messages=conversation, max_tokens=5, temperature=0
        )
        assert output["object"] == "chat.completion"
        assert output["choices"][0]["message"]["content"] == expected.choices[0].message.content
        assert output["usage"]["completion_tokens"] == expected.usage.completion_tokens


def test_openai_batch_with_one_bad_line(oai: openai.OpenAI):
    def line(custom_id: str, content: str, **body) -> str:
        body = {
            "model": TINY_MODEL,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            **body,
        }
        return json.dumps(
            {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
        )

    lines = [line("a", "Hello"), line("bad", "Hello", temperature=7), line("c", "Tell me a story")]
    uploaded = oai.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status in ("validating", "in_progress") and batch.input_file_id == uploaded.id
    batch = wait_for(lambda: oai.batches.retrieve(batch.id), lambda b: b.status in ("completed", "failed"))
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        3,
        2,
        1,
    )
    outputs = [json.loads(x) for x in oai.files.content(batch.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in outputs] == ["a", "c"]
    for output, prompt in zip(outputs, ["Hello", "Tell me a story"], strict=True):
        expected = oai.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=4
        )
        assert output["response"]["status_code"] == 200
        assert output["response"]["body"]["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    errors = [json.loads(x) for x in oai.files.content(batch.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"] and "temperature" in errors[0]["error"]["message"]
    assert errors[0]["response"]["status_code"] == 400
    assert batch.id in [b.id for b in oai.batches.list()]


def test_both_clients_share_the_file_store(oai: openai.OpenAI, tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, files\n")
    with path.open("r") as f:
        uploaded = File.upload(f)  # llmengine: multipart without a purpose
    meta = File.get(uploaded.id)
    assert (meta.filename, meta.size) == ("notes.txt", 13)
    assert File.download(uploaded.id).content == "hello, files\n"  # JSON {id, content}
    assert oai.files.retrieve(uploaded.id).bytes == 13
    assert oai.files.content(uploaded.id).content == b"hello, files\n"  # raw bytes for openai
    assert uploaded.id in [f.id for f in File.list().files] and uploaded.id in [
        f.id for f in oai.files.list()
    ]
    assert File.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(uploaded.id)


def test_bad_input_is_a_clear_4xx(batch_url: str, data_root: Path, tmp_path: Path):
    (tmp_path / "outside.json").write_text("{}")
    (data_root / "in").mkdir(exist_ok=True)
    (data_root / "link.json").symlink_to(tmp_path / "outside.json")
    base = {"output_data_path": "bad/out.json", "model_config": {"model": TINY_MODEL}}
    content = {"prompts": ["Hi"], "max_new_tokens": 2, "temperature": 0}
    cases = [
        ({**base, "model_config": {"model": "nope"}, "content": content}, 404, "nope"),
        ({**base}, 400, "content or input_data_path"),
        ({**base, "input_data_path": "missing.json"}, 400, "does not exist"),
        ({**base, "input_data_path": str(tmp_path / "outside.json")}, 400, "outside the batch data root"),
        ({**base, "input_data_path": "link.json"}, 400, "outside the batch data root"),
        ({**base, "input_data_path": "in/../../x.json"}, 400, "'..'"),
        ({**base, "output_data_path": "s3://bucket/out.json", "content": content}, 400, "data root"),
        ({**base, "content": content, "data_parallelism": 9}, 400, "batch.max_data_parallelism=2"),
        ({**base, "content": {**content, "temperature": 3}}, 400, "temperature"),
        ({**base, "content": content, "output_data_path": "in"}, 400, "is a folder"),
        ({**base, "content": content, "output_data_path": f"{data_root}/files/x"}, 400, "keeps for itself"),
        ({**base, "input_data_path": "state/jobs/x.json"}, 400, "keeps for itself"),
    ]
    for body, status, words in cases:
        answer = httpx.post(f"{batch_url}v1/llm/batch-completions", json=body, timeout=30)
        assert answer.status_code == status and words in answer.json()["detail"], (body, answer.text)
    assert httpx.get(f"{batch_url}v2/batch-completions/job_nope", timeout=30).status_code == 404
    big = httpx.post(f"{batch_url}v1/files", files={"file": ("big", b"x" * (UPLOAD_LIMIT + 1))}, timeout=30)
    assert big.status_code == 413 and "batch.max_upload_bytes" in big.json()["error"]["message"]


def test_malformed_input_file_fails_with_the_reason(data_root: Path):
    (data_root / "in").mkdir(exist_ok=True)
    (data_root / "in/broken.json").write_text("{not json")
    response = Completion.batch_create(
        input_data_path="in/broken.json",
        output_data_path="bad/broken.json",
        model_config=CreateBatchCompletionsModelConfig(model=TINY_MODEL),
    )
    job = finished_job(response.job_id)
    assert job["status"] == "failed" and "not valid JSON" in job["error"], job


def test_job_state_survives_an_ingress_restart(batch_url: str, data_root: Path):
    """Jobs live in the registry actor and its records: a new ingress replica still knows them."""
    (data_root / "in").mkdir(exist_ok=True)
    (data_root / "in/restart.json").write_text("[]")  # an empty v1 content: the job fails at once
    response = Completion.batch_create(
        input_data_path="in/restart.json",
        output_data_path="bad/restart.json",
        model_config=CreateBatchCompletionsModelConfig(model=TINY_MODEL),
    )
    before = finished_job(response.job_id)
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    (replica,) = [n for n in names if n.startswith("SERVE_REPLICA::") and f"{APP_NAME}#Ingress" in n]
    ray.kill(ray.get_actor(replica, namespace="serve"), no_restart=True)

    def read() -> dict:
        try:
            answer = httpx.get(f"{batch_url}v2/batch-completions/{response.job_id}", timeout=10)
        except httpx.TransportError:
            return {}
        return answer.json() if answer.status_code == 200 else {}

    after = wait_for(read, lambda state: bool(state) and replica not in _replica_names())
    assert replica not in _replica_names()  # a new replica answered
    assert after["job"] == before


def _replica_names() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
