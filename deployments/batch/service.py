"""What the batch routes call: checks a create request, turns it into a `JobSpec`, talks to the registry.

`BatchContext` is built where the app is built (app.py) and put on the ingress app's state by the
Ingress; it carries only settings and the served models' configs, so it pickles into the replica.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray

from deployments.batch.config import BatchSettings
from deployments.batch.files import FileStore
from deployments.batch.outputs import check_writable, parts_folder
from deployments.batch.protocol import BatchCreateBase, V1Content
from deployments.batch.registry import get_registry
from deployments.batch.storage import DataRoot
from deployments.batch.types import JobKind, JobRecord, JobSpec
from deployments.limits import LimitSettings
from deployments.protocol.llm_engine import CompletionRequest
from engine.errors import InvalidRequestError, ModelNotFoundError

UPLOAD_PATH = "/v1/files"


@dataclass(slots=True)
class BatchContext:
    settings: BatchSettings
    model_configs_json: dict[str, str]  # served name -> ModelConfig JSON
    limits: LimitSettings = field(default_factory=LimitSettings)  # applied to every row, as online
    _root: DataRoot | None = field(default=None, repr=False)

    def install(self, app: Any) -> None:
        """Put this context on the ingress app's state and give uploads their own body limit."""
        app.state.batch = self
        guard = getattr(app.state, "guard", None)
        if guard is not None and hasattr(guard, "path_body_limits"):
            limit = (UPLOAD_PATH, self.settings.max_upload_bytes, "batch.max_upload_bytes")
            app.state.guard = dataclasses.replace(guard, path_body_limits=(*guard.path_body_limits, limit))

    @property
    def root(self) -> DataRoot:
        if self._root is None:
            self._root = DataRoot(self.settings.data_root)
        return self._root

    @property
    def files(self) -> FileStore:
        return FileStore(self.root)

    @property
    def registry(self):
        return get_registry(self.settings.max_jobs_kept)

    def check_model(self, name: str) -> str:
        if name not in self.model_configs_json:
            served = ", ".join(sorted(self.model_configs_json))
            raise ModelNotFoundError(f"model {name!r} is not served here; served models: {served}")
        return self.model_configs_json[name]

    def check_parallelism(self, asked: int) -> int:
        """`asked`, or a 400 when it is more than the setting or than the cluster can place now (its
        free CPUs/GPUs: online replicas and other batch jobs keep theirs)."""
        settings = self.settings
        placeable = _num_placeable(ray.available_resources(), settings)
        limit = min(settings.max_data_parallelism, placeable)
        if asked > limit:
            raise InvalidRequestError(
                f"data_parallelism: {asked} workers asked, at most {limit} allowed now "
                f"(batch.max_data_parallelism={settings.max_data_parallelism}; the cluster's free resources "
                f"place {placeable} workers of {settings.worker_num_cpus:g} CPU, batch.worker_num_cpus)"
            )
        return asked

    def llm_engine_spec(self, body: BatchCreateBase, kind: JobKind) -> JobSpec:
        """The spec of a v1 or v2 create request; every check that can fail fast happens here (4xx)."""
        model_config_json = self.check_model(body.model_cfg.model)
        content = getattr(body, "content", None)
        if content is None and body.input_data_path is None:
            raise InvalidRequestError("content or input_data_path is required")
        if isinstance(content, V1Content):  # every prompt shares these settings: check them once
            CompletionRequest.model_validate({**content.model_dump(exclude={"prompts"}), "prompt": ""})
        input_path = ""
        if content is None:
            location = self.root.resolve(body.input_data_path, field="input_data_path")
            if not location.exists():
                raise InvalidRequestError(f"input_data_path: {location.url} does not exist")
            input_path = location.path
        output = self.root.resolve(body.output_data_path, field="output_data_path")
        spec = self._spec(
            kind,
            body.model_cfg.model,
            model_config_json,
            input_path=input_path,
            output_path=output.path,
            data_parallelism=self.check_parallelism(body.data_parallelism or 1),
            max_runtime_s=float(body.max_runtime_sec or 24 * 3600),
            inline=_inline_json(content),
        )
        self._check_output(spec)
        return spec

    def openai_spec(self, input_file_id: str, model: str) -> JobSpec:
        model_config_json = self.check_model(model)
        input_path = self.files.path_of(input_file_id).path
        spec = self._spec(
            JobKind.OPENAI,
            model,
            model_config_json,
            input_path=input_path,
            output_path="",
            data_parallelism=1,
            max_runtime_s=24 * 3600.0,
            inline=None,
        )
        self._check_output(spec)
        return spec

    def _spec(
        self,
        kind: JobKind,
        model: str,
        model_config_json: str,
        *,
        input_path: str,
        output_path: str,
        data_parallelism: int,
        max_runtime_s: float,
        inline: str | None,
    ) -> JobSpec:
        prefix = "batch" if kind == JobKind.OPENAI else "job"
        job_id = f"{prefix}_{uuid.uuid4().hex}"
        return JobSpec(
            job_id=job_id,
            kind=kind,
            model=model,
            model_config_json=model_config_json,
            input_path=input_path,
            output_path=output_path or self.root.internal("jobs", job_id).path,
            data_root=self.settings.data_root,
            data_parallelism=data_parallelism,
            max_runtime_s=max_runtime_s,
            batch_settings_json=self.settings.model_dump_json(),
            limits_json=self.limits.model_dump_json(),
            inline_input_json=inline,
        )

    def _check_output(self, spec: JobSpec) -> None:
        if spec.kind != JobKind.OPENAI:
            output = self.root.resolve(spec.output_path, field="output_data_path")
            if output.fs.isdir(output.path):
                raise InvalidRequestError(f"output_data_path: {output.url} is a folder; name a file")
        folder = parts_folder(spec)
        try:
            check_writable(folder)
        except OSError as exc:
            raise InvalidRequestError(f"output_data_path: cannot write under {folder.url}: {exc}") from None

    async def create(self, spec: JobSpec, request: dict[str, Any], metadata: dict[str, str]) -> JobRecord:
        return await self.registry.create.remote(spec, json.dumps(request), metadata)


def _inline_json(content: Any) -> str | None:
    if content is None:
        return None
    if isinstance(content, V1Content):
        return content.model_dump_json()
    return json.dumps(content)


def _num_placeable(free: dict[str, float], settings: BatchSettings) -> int:
    num = math.floor(free.get("CPU", 0.0) / settings.worker_num_cpus + 1e-9)
    if settings.worker_num_gpus:
        num = min(num, math.floor(free.get("GPU", 0.0) / settings.worker_num_gpus + 1e-9))
    return num
