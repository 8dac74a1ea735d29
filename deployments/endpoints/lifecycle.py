"""What Serve's state of an endpoint's application means for its record: a pure decision.

The controller's watcher asks `settle` for every record it watches and carries out the answer; nothing
else changes a status (GET and list only read).
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.endpoints.deployer import AppState
from deployments.endpoints.registry import PENDING, READY, EndpointRecord

NEVER_DEPLOYED_S = 60.0  # a pending record whose application never appeared
# Serve's controller applies a new target within its loop; a RUNNING read sooner may be the old target's.
SETTLE_AFTER_S = 2.0
_FAILED_APP = ("DEPLOY_FAILED", "UNHEALTHY")


@dataclass(frozen=True, slots=True)
class Settle:
    """What to do with a record: become READY, or fail with `reason`; None from `settle`: nothing."""

    is_ready: bool
    reason: str | None = None


def settle(
    record: EndpointRecord, app: AppState | None, now_s: float, start_timeout_s: float
) -> Settle | None:
    """The record's next step given Serve's state `app` of its application (None: no such application)."""
    elapsed_s = now_s - record.pending_since_s
    if record.status == READY and app is None:
        return Settle(False, f"its Serve application {record.app_name!r} is gone (deleted outside this API)")
    if record.status != PENDING:
        return None
    if app is not None and app.status == "RUNNING" and elapsed_s > SETTLE_AFTER_S:
        return Settle(True)
    if app is not None and app.status in _FAILED_APP:
        return Settle(False, f"Serve reports {app.status}: {app.message}")
    if app is None and elapsed_s > NEVER_DEPLOYED_S:
        return Settle(False, f"its Serve application {record.app_name!r} was never deployed")
    if elapsed_s > start_timeout_s:
        said = f"; Serve says: {app.message}" if app is not None and app.message else ""
        return Settle(False, f"no replica was running {start_timeout_s:g} s after the change{said}")
    return None
