"""What the batch routes call: checks a create request, turns it into a `JobSpec`, talks to the registry.

`BatchContext` is built where the app is built (app.py) and put on the ingress app's state by the
Ingress; it carries only settings and the served models' configs, so it pickles into the replica. Its
spec builders do file I/O (paths resolved, the output probed): the routes call them from a thread.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray

from deployments.batch.config import BatchSettings
from deployments.batch.files import FileStore
from deployments.batch.outputs import check_writable, parts_folder
from deployments.batch.protocol import BatchCreateBase, V1Content
from deployments.batch.registry import JobRegistry, job_store, registry_name
from deployments.batch.storage import JOBS_FOLDER, DataRoot
from deployments.batch.types import JobKind, JobRecord, JobSpec
from deployments.batch.uploads import UploadSlots, upload_description
from deployments.limits import LimitSettings
from deployments.model_server import EngineFactory
from deployments.protocol.llm_engine import CompletionRequest
from deployments.state.owner import owner, owner_async
from engine.errors import InvalidRequestError, ModelNotFoundError

UPLOAD_PATH = "/v1/files"
MODEL_SCAN_BYTES = 1024 * 1024  # an OpenAI batch's model is read from the lines in its first MiB
logger = logging.getLogger("ray.serve")
T = TypeVar("T")


@dataclass(slots=True)
class BatchContext:
    settings: BatchSettings
    model_configs_json: dict[str, str]  # served name -> ModelConfig JSON
    limits: LimitSettings = field(default_factory=LimitSettings)  # applied to every row, as online
    engine_factory: str | None = None  # "module:function" of the app's EngineFactory (tests)
    _root: DataRoot | None = field(default=None, repr=False)
    _registry: Any = field(default=None, repr=False)  # this replica's handle of the registry actor
    _uploads: UploadSlots | None = field(default=None, repr=False)

    def install(self, app: Any, start_registry: bool = True) -> None:
        """Put this context on the ingress app's state, give uploads their own body limit and, when jobs
        were left unfinished, start the registry (so that queued jobs run again without a request)."""
        app.state.batch = self
        guard = getattr(app.state, "guard", None)
        if guard is not None and hasattr(guard, "path_body_limits"):
            limit = (UPLOAD_PATH, self.settings.max_upload_bytes, "batch.max_upload_bytes")
            app.state.guard = dataclasses.replace(guard, path_body_limits=(*guard.path_body_limits, limit))
        _publish_upload_bounds(app, self.settings)
        _ = self.root  # the folder is made here, in the replica's constructor, not on its event loop
        if start_registry:
            threading.Thread(target=self._start_registry, daemon=True, name="batch-registry").start()

    @property
    def root(self) -> DataRoot:
        if self._root is None:
            self._root = DataRoot(self.settings.data_root)
        return self._root

    @property
    def files(self) -> FileStore:
        return FileStore(self.root)

    @property
    def uploads(self) -> UploadSlots:
        if self._uploads is None:
            self._uploads = UploadSlots(self.settings.max_concurrent_uploads)
        return self._uploads

    def _registry_args(self) -> tuple:
        return (JobRegistry, registry_name(self.settings.data_root), self.settings.data_root)

    def _start_registry(self) -> None:
        try:
            if all(r.status.is_terminal for r in job_store(self.settings.data_root).all()):
                return  # nothing to resume: the registry starts with the first batch request
            registry = owner(*self._registry_args(), self.settings.max_jobs_kept)
            ray.get(registry.ready.remote())
        except Exception:  # the first request tries again
            logger.exception("the batch job registry did not start")

    async def ask(self, call: Callable[[Any], Awaitable[T]]) -> T:
        """`call(registry)`, once more with a fresh handle if the actor was replaced (a code upgrade)."""
        for attempt in range(2):
            if self._registry is None:
                self._registry = await owner_async(*self._registry_args(), self.settings.max_jobs_kept)
            try:
                return await call(self._registry)
            except ray.exceptions.RayActorError:
                self._registry = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def check_model(self, name: str) -> str:
        if name not in self.model_configs_json:
            served = ", ".join(sorted(self.model_configs_json))
            raise ModelNotFoundError(f"model {name!r} is not served here; served models: {served}")
        return self.model_configs_json[name]

    def check_parallelism(self, asked: int) -> int:
        """`asked`, or a 400 above batch.max_data_parallelism. A job the cluster cannot place now waits
        in the queue; one it could never place is refused by the registry."""
        if asked > self.settings.max_data_parallelism:
            raise InvalidRequestError(
                f"data_parallelism: {asked} workers asked, at most "
                f"batch.max_data_parallelism={self.settings.max_data_parallelism} allowed"
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
        data_parallelism = self.check_parallelism(body.data_parallelism or 1)
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
            data_parallelism=data_parallelism,
            max_runtime_s=float(body.max_runtime_sec or 24 * 3600),
            inline=_inline_json(content),
        )
        self._check_output(spec)
        return spec

    def openai_spec(self, input_file_id: str) -> JobSpec:
        """The spec of an OpenAI batch; its model is the one its input file's lines name."""
        model = _model_of_first_line(self.files.head(input_file_id, MODEL_SCAN_BYTES))
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
            output_path=output_path or self.root.internal(JOBS_FOLDER, job_id).path,
            data_root=self.settings.data_root,
            data_parallelism=data_parallelism,
            max_runtime_s=max_runtime_s,
            batch_settings_json=self.settings.model_dump_json(),
            limits_json=self.limits.model_dump_json(),
            inline_input_json=inline,
            engine_factory=self.engine_factory,
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
        request_json = json.dumps(request)
        return await self.ask(lambda registry: registry.create.remote(spec, request_json, metadata))


def _publish_upload_bounds(app: Any, settings: BatchSettings) -> None:
    """The published schema states this app's upload bounds (the route's own text has the defaults)."""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        schema = make_schema()
        upload = schema.get("paths", {}).get(UPLOAD_PATH, {}).get("post")
        if upload is not None:
            upload["description"] = upload_description(settings)
        return schema

    app.openapi = openapi


def factory_path(engine_factory: EngineFactory | None) -> str | None:
    """A module-level engine factory as "module:function", so the batch workers import the same one
    (None for any other: the workers then load the model as online replicas do by default)."""
    if engine_factory is None:
        return None
    module, name = getattr(engine_factory, "__module__", ""), getattr(engine_factory, "__qualname__", "")
    try:
        is_importable = getattr(importlib.import_module(module), name, None) is engine_factory
    except ImportError:
        is_importable = False
    return f"{module}:{name}" if is_importable else None


def _inline_json(content: Any) -> str | None:
    if content is None:
        return None
    if isinstance(content, V1Content):
        return content.model_dump_json()
    return json.dumps(content)


def _model_of_first_line(content: bytes) -> str:
    """The batch's model: OpenAI batches name it on every line; the first line that parses decides."""
    for line in content.decode("utf-8", errors="replace").splitlines():
        try:
            model = json.loads(line).get("body", {}).get("model")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(model, str) and model:
            return model
    raise InvalidRequestError(
        f"input_file_id: no line in the file's first {MODEL_SCAN_BYTES} bytes names a body.model"
    )
