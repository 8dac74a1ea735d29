"""A small owner actor for tests/deployments/test_state_owner.py (importable by Ray's workers)."""

from deployments.state.owner import VersionedOwner


class Counter(VersionedOwner):
    def __init__(self, start: int) -> None:
        self.count = start

    def increment(self) -> int:
        self.count += 1
        return self.count

    def crash(self) -> None:
        import os

        os._exit(1)
