"""Schemathesis over every operation of the real app's `/openapi.json`: no 5xx, responses as published.

The app is the real ingress and engine on the tiny random-weight model, with a 48-token context so
that every generated request that reaches the model costs at most 48 tokens (a chat request without
`max_tokens` generates up to the context): the bounds in the schema stay as published and are fuzzed
in full. Schemathesis 4.32 runs as its CLI: its coverage phase (deterministic boundary and invalid
values of every field) and its fuzzing phase (50 random cases per operation in the full test profile,
15 in the default one), checks `not_a_server_error` and `response_schema_conformance` (JSON bodies and
each SSE event), and no operation is excluded.

`schema_fuzz_hooks.py` supplies the served model name (three generated names in four), and reaches the
success paths: the first cases of every operation on a runtime endpoint, file, batch or job get a real
one (made for the case; jobs cancelled at once, endpoints scaled to zero), and the first cases of the
creates a valid body; the test checks each of those operations answered 2xx. Reusing ids from earlier
responses is off in both phases (`extra-data-sources`): with it, DELETE of a file drew from the few
real ids and stopped after ~18 distinct cases, and a completion reached an endpoint still starting
(its 503 is by design).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deployments.app import build_app_from_configs
from deployments.batch.config import BatchSettings
from deployments.config import REPO_ROOT, DeploymentSettings, EndpointSettings, EngineSettings, ModelConfig
from tests.integration import schema_fuzz_hooks
from tests.integration.tiny_app import TINY_MODEL
from tests.serve_fixtures import delete_app, run_app
from tests.suite_profile import sized

APP = "fuzz"
FUZZ_MAX_MODEL_LEN = 48
# random cases of each operation that takes input (a body or parameters), after the deterministic
# coverage phase: 50 in the full test profile, fewer in the default one (tests/suite_profile.py)
MIN_CASES_PER_OPERATION = int(sized(quick=15, full=50))
SEED = int(os.environ.get("LLMSERVE_FUZZ_SEED", "1"))  # fixed in CI; set another to explore
RUN_TIMEOUT_S = 840
CONFIG = """
[phases.coverage.extra-data-sources]
responses = false

[phases.fuzzing.extra-data-sources]
responses = false
"""


@pytest.fixture(scope="module")
def fuzz_app_url(
    serve_port: int, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    model = ModelConfig(
        name=TINY_MODEL,
        model=str(tiny_model_dir),
        engine=EngineSettings(
            dtype="float32", max_model_len=FUZZ_MAX_MODEL_LEN, kv_cache_bytes=8 * 1024**2, num_threads=1
        ),
        deployment=DeploymentSettings(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32),
    )
    batch = BatchSettings(data_root=str(tmp_path_factory.mktemp("fuzz_batch_root")))  # its jobs and files
    # runtime endpoints of the tiny model (the hooks' success paths), with the same small engine
    endpoints = EndpointSettings(engine=model.engine, checkpoint_roots=[str(tiny_model_dir.parent)])
    app = build_app_from_configs([model], batch=batch, endpoints=endpoints)
    url = run_app(app, name=APP, route_prefix=f"/{APP}", port=serve_port)
    yield url
    with httpx.Client(base_url=url, timeout=60) as client:  # endpoints a generated create left behind
        for endpoint in client.get("v1/llm/model-endpoints").json()["model_endpoints"]:
            if endpoint["name"] != TINY_MODEL:
                client.delete(f"v1/llm/model-endpoints/{endpoint['name']}")
    delete_app(APP)


def operations_with_input(schema: dict) -> set[str]:
    """Labels ("POST /v1/completions") of the operations that take a body or parameters."""
    return {
        f"{method.upper()} {path}"
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if operation.get("parameters") or operation.get("requestBody")
    }


# CPython 3.11.7's ast.parse can raise this SystemError when called deep in a stack (fixed in later
# 3.11 releases); hypothesis calls it to describe lambdas while it builds recursive JSON strategies, so
# a case-generation step crashed now and then (twice in a row in one CI run). schema_fuzz_hooks.py now
# describes such a lambda as "<unknown>" instead; should the bug still surface, no request was sent and
# the run is repeated with the next seed. Any failed check, or any other error, fails the test at once.
_GENERATOR_BUG = "AST constructor recursion depth mismatch"


@pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)
def test_every_operation_survives_the_fuzzer(fuzz_app_url: str, tiny_model_dir: Path, tmp_path: Path):
    schema = httpx.get(fuzz_app_url + "openapi.json", timeout=30).json()
    labels = {f"{m.upper()} {p}" for p, item in schema["paths"].items() for m in item}
    fixtures = {"url": fuzz_app_url, "model": TINY_MODEL, "checkpoint": str(tiny_model_dir)}
    for attempt in range(2):
        folder = tmp_path / f"attempt-{attempt}"
        run, report, num_calls, num_ok = _fuzz(fuzz_app_url, folder, SEED + attempt, fixtures)
        output = run.stdout + run.stderr
        is_generator_bug = not report["failures"] and report["errors"] and _GENERATOR_BUG in output
        if not is_generator_bug:
            break
        print(f"schemathesis seed {SEED + attempt}: case generation hit CPython's ast bug; next seed")
    print(  # the figures the README quotes
        f"\nschemathesis: {report['test_cases']['generated']} cases generated, {sum(num_calls.values())} "
        f"requests, {len(labels)} operations, {report['running_time']:.0f} s, seed {SEED + attempt}"
    )
    for label in sorted(labels):
        print(f"  {num_calls[label]:5d} ({num_ok[label]:4d} 2xx)  {label}")
    assert run.returncode == 0, output[-12000:]
    assert report["failures"] == [] and report["errors"] == [], output[-12000:]
    assert report["operations"]["tested"] == report["operations"]["total"] == len(labels), report[
        "operations"
    ]
    assert set(num_calls) == labels  # every published operation was called: none excluded
    few = {label: num_calls[label] for label in operations_with_input(schema)}
    assert all(n >= MIN_CASES_PER_OPERATION for n in few.values()), few
    # the success paths were reached: every operation the hooks give real ids or bodies answered 2xx
    never_ok = sorted(label for label in schema_fuzz_hooks.SUCCESS_PATHS if num_ok[label] == 0)
    assert never_ok == [], never_ok


def _fuzz(
    url: str, folder: Path, seed: int, fixtures: dict[str, str]
) -> tuple[subprocess.CompletedProcess, dict, Counter, Counter]:
    """One schemathesis run: the process, its JSON report, the requests and the 2xx answers per operation."""
    folder.mkdir()
    calls_file, report_dir, config = folder / "calls.txt", folder / "report", folder / "schemathesis.toml"
    config.write_text(CONFIG)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": schema_fuzz_hooks.__file__,
        # the hooks import tests.suite_profile: the repository on the path, as in this process
        "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO_ROOT), os.environ.get("PYTHONPATH")))),
        schema_fuzz_hooks.MODELS_ENV: TINY_MODEL,
        schema_fuzz_hooks.CALLS_ENV: str(calls_file),
        schema_fuzz_hooks.FIXTURES_ENV: json.dumps(fixtures),
    }
    command = [
        sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", str(config),
        "run", url + "openapi.json",
        "--url", url.rstrip("/"),
        "--phases", "coverage,fuzzing",
        "--checks", "not_a_server_error,response_schema_conformance",
        "--max-examples", str(MIN_CASES_PER_OPERATION),
        "--seed", str(seed),
        "--workers", "2",
        "--request-timeout", "60",
        "--report", "json", "--report-dir", str(report_dir),
    ]  # fmt: skip
    run = subprocess.run(
        command, env=env, cwd=folder, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    report = json.loads(next(report_dir.glob("json-*.json")).read_text())
    calls = [line.split() for line in calls_file.read_text().splitlines()]
    num_calls = Counter(" ".join(call[:2]) for call in calls)
    num_ok = Counter(" ".join(call[:2]) for call in calls if call[2].startswith("2"))
    return run, report, num_calls, num_ok
