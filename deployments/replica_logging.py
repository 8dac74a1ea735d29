"""Make the libraries' log records (model loading, engine) show in a Serve replica's log.

Serve writes only the `ray.serve` logger to the replica's log file (and stderr); `model_zoo` and
`engine` log under their own names, whose INFO records the root logger (WARNING) would drop. In Serve's
throughput-optimized mode (the README's server command) Serve keeps replica logs off stderr and buffers
its log file, so these few loading records are also written to stderr themselves: `serve run` still
shows a model's progress as it happens.
"""

import logging
import sys

from ray.serve.context import _get_internal_replica_context

SERVE_LOGGER = "ray.serve"
LOADING_LOGGER = "deployments.loading"  # the model server's own loading and ready messages
LIBRARY_LOGGERS = ("model_zoo", "engine", LOADING_LOGGER)
STDERR_FORMAT = "%(levelname)s %(asctime)s %(name)s -- %(message)s"


class _ForwardHandler(logging.Handler):
    """Hands each record to another logger's handlers (Serve's: its format, replica tags and file)."""

    def __init__(self, target: logging.Logger) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


class _StderrHandler(logging.StreamHandler):
    """Writes records to the process's own stderr (file descriptor 2), which Ray streams to the `serve
    run` terminal. Not `sys.stderr`: inside a replica Serve replaces it with a stream into its own logger,
    whose file handler holds records back (1,000 at a time in the throughput mode)."""

    def __init__(self) -> None:
        super().__init__(sys.__stderr__ or sys.stderr)
        self.setFormatter(logging.Formatter(STDERR_FORMAT))


def forward_library_logs_in_replica() -> None:
    """`forward_library_logs()` inside a Serve replica; nothing elsewhere (tests keep their logging)."""
    if _get_internal_replica_context() is not None:
        forward_library_logs()
        if not _serve_logs_to_stderr():
            copy_library_logs_to_stderr()


def _serve_logs_to_stderr() -> bool:
    """Whether Serve itself writes replica logs to stderr (off in its throughput-optimized mode)."""
    from ray.serve._private import constants  # Ray 2.60 has no public flag for it

    return bool(getattr(constants, "RAY_SERVE_LOG_TO_STDERR", True))


def forward_library_logs(names: tuple[str, ...] = LIBRARY_LOGGERS, level: int = logging.INFO) -> None:
    """Forward `names`' records at `level` and above to the `ray.serve` logger; idempotent."""
    target = logging.getLogger(SERVE_LOGGER)
    for name in names:
        library = logging.getLogger(name)
        if library.level == logging.NOTSET or library.level > level:
            library.setLevel(level)
        _add_handler_once(library, _ForwardHandler, target)
        library.propagate = False  # the root logger would print them a second time


def copy_library_logs_to_stderr(names: tuple[str, ...] = LIBRARY_LOGGERS) -> None:
    """Also write `names`' records to stderr; idempotent. Use after `forward_library_logs`."""
    for name in names:
        _add_handler_once(logging.getLogger(name), _StderrHandler)


def _add_handler_once(library: logging.Logger, kind: type[logging.Handler], *args) -> None:
    """Add a `kind(*args)` handler unless the logger has one of that kind already."""
    if not any(isinstance(h, kind) for h in library.handlers):
        library.addHandler(kind(*args))
