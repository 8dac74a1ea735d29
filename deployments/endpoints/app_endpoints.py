"""The endpoints of one ingress app as the controller holds them: records, per-name locks, versions."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from deployments.endpoints.registry import DELETING, EndpointRecord
from deployments.endpoints.snapshot import Attachment, RouteEntry, Snapshot
from deployments.state.store import RecordStore
from engine.errors import ModelNotFoundError


class AppEndpoints:
    """The endpoints of one ingress app: its records (the store's, in memory) and who waits on them."""

    def __init__(self, attachment: Attachment, store: RecordStore[EndpointRecord], started_ns: int) -> None:
        self.attachment = attachment
        self.store = store
        self.records: dict[str, EndpointRecord] = {}
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.changed = asyncio.Condition()
        self._started_ns, self._counter = started_ns, 0

    @property
    def version(self) -> tuple[int, int]:
        return self._started_ns, self._counter

    async def bump(self) -> None:
        async with self.changed:
            self._counter += 1
            self.changed.notify_all()

    def snapshot(self) -> Snapshot:
        routes = {
            name: RouteEntry(
                r.app_name,
                r.deployment_name,
                r.is_serving,
                r.status,
                r.status_reason,
                r.config.replica_wait_timeout_s,
            )
            for name, r in self.records.items()
            if r.status != DELETING
        }
        return Snapshot(self.version, routes)

    def live(self, name: str) -> EndpointRecord:
        record = self.records.get(name)
        if record is None or record.status == DELETING:
            raise ModelNotFoundError(f"The requested model endpoint {name!r} could not be found.")
        return record
