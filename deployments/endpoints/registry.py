"""The records of runtime endpoints, one JSON file per endpoint under the app's state root.

`<state_root>/endpoints/<ingress app>/<name>.json` (deployments/state/store.py): outside Ray, so they
outlive the cluster. Only the endpoint controller writes them (deployments/endpoints/controller.py).
Reading is tolerant: fields that this release does not know, at any depth, are dropped rather than
making the record unreadable (a downgrade after an upgrade keeps every endpoint).
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, field_validator

from deployments.config import ModelConfig
from deployments.endpoints.wire import Quantity, Status
from deployments.state.store import RecordStore

logger = logging.getLogger("ray")

SCHEMA_VERSION = 1
PENDING, READY, FAILED, DELETING = "UPDATE_PENDING", "READY", "UPDATE_FAILED", "DELETE_IN_PROGRESS"
KV_NAMESPACE = "llmserve"  # where releases before the state root kept records (Ray's internal KV)


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

    @field_validator("config", "previous_config", mode="before")
    @classmethod
    def _known_fields_only(cls, value: Any) -> Any:
        return known_fields(ModelConfig, value) if isinstance(value, dict) else value


def known_fields(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys `model` (and its nested models) does not declare: ModelConfig forbids
    extra keys, and a record written by a later release must still be read."""
    kept = {}
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel) and isinstance(value, dict):
            value = known_fields(nested, value)
        kept[key] = value
    return kept


def open_store(state_root: str, ingress_app: str) -> RecordStore[EndpointRecord]:
    """The records of the runtime endpoints of `ingress_app` (blocks: file I/O)."""
    return RecordStore(state_root, f"endpoints/{ingress_app}", EndpointRecord, SCHEMA_VERSION)


def migrate_from_ray_kv(store: RecordStore[EndpointRecord], ingress_app: str) -> list[str]:
    """Move the records that earlier releases kept in Ray's internal KV into `store`; their names.

    Those records live as long as the Ray cluster, so there is something to move only when new code is
    deployed onto a running cluster. A name already in the store keeps the store's record."""
    from ray.experimental import internal_kv

    prefix = f"endpoints/{ingress_app}/"
    try:
        keys = internal_kv._internal_kv_list(prefix.encode(), namespace=KV_NAMESPACE)
    except Exception:  # no KV here (not in a Ray worker), or a Ray without it: nothing to move
        return []
    moved = []
    for key in keys:
        name = key.decode().removeprefix(prefix)
        raw = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        try:
            record = EndpointRecord.model_validate(json.loads(raw)) if raw is not None else None
        except ValueError as exc:
            logger.warning("endpoint record %r in Ray's KV is unreadable, not migrated: %s", name, exc)
            record = None
        if record is not None and store.get(name) is None:
            store.put(name, record)
            moved.append(name)
        internal_kv._internal_kv_del(key, namespace=KV_NAMESPACE)
    return moved
