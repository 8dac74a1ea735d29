"""Wire types of the batch routes: LLM Engine batch completions (v1, v2), OpenAI Batch and File objects.

Shapes follow scaleapi/llm-engine's `llmengine.data_types.batch_completion` and `rest` (file API) and
OpenAI's Batch and File objects. Unknown keys are ignored: the clients send fields (cpus, gpu_type,
vLLM knobs) that mean nothing here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.batch.types import JobStatus

MAX_RUNTIME_S = 2 * 24 * 3600  # the client's bound on max_runtime_sec


class V1Content(BaseModel):
    """`CreateBatchCompletionsV1RequestContent`: many prompts, one set of sampling settings."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompts: list[str] = Field(min_length=1, description="The prompts; outputs come back in this order.")
    max_new_tokens: int = Field(ge=1, description="Most tokens to generate per prompt.")
    temperature: float = Field(ge=0.0, le=1.0, description="Sampling temperature; 0 = greedy.")
    stop_sequences: list[str] | None = None
    return_token_log_probs: bool | None = False
    presence_penalty: float | None = Field(None, ge=0.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=2.0)
    top_k: int | None = Field(None, ge=-1)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    skip_special_tokens: bool | None = True


class BatchModelConfig(BaseModel):
    """`model_config` of a batch request; only `model` (a served model's name) is used here."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="The served model's name (see /v1/llm/model-endpoints).")
    checkpoint_path: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class BatchCreateBase(BaseModel):
    """Fields shared by the v1 and v2 create requests (`BatchCompletionsRequestBase`)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    input_data_path: str | None = Field(None, description="JSON input under the batch data root.")
    output_data_path: str = Field(min_length=1, description="Where the JSON list of outputs is written.")
    model_cfg: BatchModelConfig = Field(alias="model_config", description="The model to run.")
    labels: dict[str, str] | None = None
    data_parallelism: int | None = Field(1, ge=1, le=64, description="Engine workers (Ray Data actors).")
    max_runtime_sec: int | None = Field(24 * 3600, ge=1, le=MAX_RUNTIME_S, description="Then the job stops.")
    priority: str | None = None
    tool_config: dict[str, Any] | None = None

    @field_validator("tool_config")
    @classmethod
    def _no_tools(cls, tool_config: dict[str, Any] | None) -> dict[str, Any] | None:
        if tool_config is not None:
            raise ValueError("tool_config is not supported by this server")
        return tool_config


class CreateV1Request(BatchCreateBase):
    content: V1Content | None = None


class CreateV2Request(BatchCreateBase):
    content: V1Content | list[dict[str, Any]] | None = None


class CreateV1Response(BaseModel):
    job_id: str


class BatchJob(BaseModel):
    """`BatchCompletionsJob`, plus `progress` (requests done / total) and the failure reason."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    job_id: str
    input_data_path: str | None
    output_data_path: str
    model_cfg: dict[str, Any] = Field(alias="model_config")
    priority: str | None = None
    status: Literal["queued", "running", "completed", "failed", "cancelled", "unknown"]
    created_at: str
    expires_at: str
    completed_at: str | None
    metadata: dict[str, str] | None
    progress: dict[str, int]
    error: str | None = None
    queue_reason: str | None = Field(None, description="While queued: what the job waits for.")


class GetJobResponse(BaseModel):
    job: BatchJob


class CancelJobResponse(BaseModel):
    success: bool


class OpenAIBatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[str, str] | None = None


_OPENAI_STATUS = {
    JobStatus.QUEUED: "validating",
    JobStatus.RUNNING: "in_progress",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}


def openai_status(status: JobStatus, is_cancelling: bool, is_expired: bool) -> str:
    if is_expired and status == JobStatus.FAILED:
        return "expired"
    if is_cancelling and not status.is_terminal:
        return "cancelling"
    return _OPENAI_STATUS[status]


class FileObject(BaseModel):
    """OpenAI's File object with LLM Engine's `size` too, so both clients parse the same answer."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    size: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"


class FileList(BaseModel):
    """OpenAI's list (`data`) and LLM Engine's (`files`) in one body."""

    object: Literal["list"] = "list"
    data: list[FileObject]
    files: list[FileObject]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FileContent(BaseModel):
    """LLM Engine's `GetFileContentResponse`."""

    id: str
    content: str
