"""Typed values shared by the batch routes, the job registry, the runners and the workers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import ServingError


class BatchNotFoundError(ServingError):
    """No batch job or stored file has this id (HTTP 404)."""

    status_code = 404


class TooManyUploadsError(ServingError):
    """batch.max_concurrent_uploads uploads are in progress (HTTP 429)."""

    status_code = 429


class JobKind(StrEnum):
    V1 = "v1"  # LLM Engine v1: one set of sampling settings, many prompts; output a JSON list
    V2 = "v2"  # LLM Engine v2: a list of OpenAI-shaped requests; output a JSON list of responses
    OPENAI = "openai"  # OpenAI Batch API: JSONL lines in, output and error JSONL files out


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything a runner needs to run one job; built and checked by the routes."""

    job_id: str
    kind: JobKind
    model: str  # the served name (its ModelConfig travels as JSON in model_config_json)
    model_config_json: str
    input_path: str  # resolved, under the data root
    output_path: str  # v1/v2: the JSON list; openai: the folder of the job's parts
    data_root: str
    data_parallelism: int
    max_runtime_s: float
    batch_settings_json: str
    limits_json: str  # deployments.limits.LimitSettings, checked on every row
    v1_content_json: str | None = None  # v1: the sampling settings shared by every prompt
    inline_input_json: str | None = None  # content sent in the request instead of an input file
    # "module:function" of the app's EngineFactory when it was built with one (tests: a fake engine); set
    # only by Python code that builds the app, never from a request or the YAML config.
    engine_factory: str | None = None


class JobRecord(BaseModel):
    """A job's state: what its status routes report, and what the registry persists (one JSON file)."""

    model_config = ConfigDict(extra="ignore")

    spec: JobSpec
    created_at: float
    status: JobStatus = JobStatus.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested_at: float | None = None
    num_total: int = 0
    num_done: int = 0
    num_failed: int = 0
    worker_ids: list[str] = Field(default_factory=list)
    error: str | None = None
    queue_reason: str | None = None  # while queued: what the job waits for
    output_file_id: str | None = None  # openai
    error_file_id: str | None = None  # openai
    metadata: dict[str, str] = Field(default_factory=dict)
    request_json: str = "{}"  # the create request as the client sent it (model_config, labels...)


@dataclass(frozen=True, slots=True)
class Progress:
    """What a runner reports after each finished Ray Data batch."""

    num_total: int
    num_done: int
    num_failed: int
    worker_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """A runner's last word: the final status, why, the files it produced and its final counts.

    The counts travel here too: the runner's last `report` is a separate actor call that may reach
    the registry after this outcome, when the record is terminal and no longer takes reports."""

    status: JobStatus
    error: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    progress: Progress | None = None
