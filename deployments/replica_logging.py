"""Make the libraries' log records (model loading, engine) show in a Serve replica's log.

Serve writes only the `ray.serve` logger to the replica's log file (and stderr); `model_zoo` and
`engine` log under their own names, whose INFO records the root logger (WARNING) would drop.
"""

import logging

from ray.serve.context import _get_internal_replica_context

SERVE_LOGGER = "ray.serve"
LIBRARY_LOGGERS = ("model_zoo", "engine")


class _ForwardHandler(logging.Handler):
    """Hands each record to another logger's handlers (Serve's: its format, replica tags and file)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def forward_library_logs_in_replica() -> None:
    """`forward_library_logs()` inside a Serve replica; nothing elsewhere (tests keep their logging)."""
    if _get_internal_replica_context() is not None:
        forward_library_logs()


def forward_library_logs(names: tuple[str, ...] = LIBRARY_LOGGERS, level: int = logging.INFO) -> None:
    """Forward `names`' records at `level` and above to the `ray.serve` logger; idempotent."""
    target = logging.getLogger(SERVE_LOGGER)
    for name in names:
        library = logging.getLogger(name)
        if library.level == logging.NOTSET or library.level > level:
            library.setLevel(level)
        if not any(isinstance(h, _ForwardHandler) for h in library.handlers):
            library.addHandler(_ForwardHandler(target))
        library.propagate = False  # the root logger would print them a second time
