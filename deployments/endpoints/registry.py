"""The runtime endpoints of one app, kept in Ray's internal key-value store (in the GCS).

Not in the ingress's memory: a replaced ingress replica, and every other ingress replica, read the
same records. Keys are `endpoints/<ingress app>/<endpoint name>` in the `llmserve` namespace.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pydantic import BaseModel, Field
from ray.experimental import internal_kv

from deployments.config import ModelConfig
from deployments.endpoints.wire import Quantity, Status

NAMESPACE = "llmserve"
PENDING, READY, FAILED = "UPDATE_PENDING", "READY", "UPDATE_FAILED"


class EndpointRecord(BaseModel):
    """One runtime endpoint: what was asked, what is deployed, and where it stands."""

    name: str
    app_name: str = Field(description="Its own Serve application.")
    deployment_name: str
    model_name: str = Field(description="As the request named it (zoo name or a label).")
    config: ModelConfig = Field(description="What is deployed (or being deployed).")
    previous_config: ModelConfig | None = Field(None, description="Restored if an update fails.")
    storage: Quantity | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: dict = Field(default_factory=dict)
    image_tag: str | None = Field(None, description="inference_framework_image_tag as requested.")
    public_inference: bool | None = True
    status: Status = PENDING
    status_reason: str | None = None
    is_serving: bool = Field(False, description="Deployed and READY once: requests route to it.")
    task_id: str = Field(description="Id of the latest create or update.")
    pending_since_s: float = Field(default_factory=time.time, description="Start of the latest change.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    last_updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class EndpointRegistry:
    """Records of one ingress app's runtime endpoints. Each call is one small GCS round trip."""

    def __init__(self, ingress_app: str) -> None:
        self._prefix = f"endpoints/{ingress_app}/"

    def _key(self, name: str) -> bytes:
        return (self._prefix + name).encode()

    def add(self, record: EndpointRecord) -> bool:
        """Store a new record; False if the name is taken (atomic: two creates, one wins)."""
        exists = internal_kv._internal_kv_put(
            self._key(record.name), record.model_dump_json().encode(), overwrite=False, namespace=NAMESPACE
        )
        return not exists

    def put(self, record: EndpointRecord) -> None:
        record.last_updated_at = datetime.now(UTC)
        internal_kv._internal_kv_put(
            self._key(record.name), record.model_dump_json().encode(), overwrite=True, namespace=NAMESPACE
        )

    def replace(self, record: EndpointRecord) -> None:
        """`put`, unless the record was deleted or changed by a newer create/update meanwhile (a settle
        must not bring a deleted endpoint back). Read-then-write: it narrows the race, it is not atomic."""
        current = self.get(record.name)
        if current is not None and current.task_id == record.task_id:
            self.put(record)

    def get(self, name: str) -> EndpointRecord | None:
        raw = internal_kv._internal_kv_get(self._key(name), namespace=NAMESPACE)
        return EndpointRecord.model_validate_json(raw) if raw is not None else None

    def remove(self, name: str) -> None:
        internal_kv._internal_kv_del(self._key(name), namespace=NAMESPACE)

    def names(self) -> list[str]:
        keys = internal_kv._internal_kv_list(self._prefix.encode(), namespace=NAMESPACE)
        return sorted(k.decode().removeprefix(self._prefix) for k in keys)

    def all(self) -> list[EndpointRecord]:
        records = (self.get(name) for name in self.names())
        return [r for r in records if r is not None]
