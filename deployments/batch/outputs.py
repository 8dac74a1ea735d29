"""A job's outputs: part files written as Ray Data batches finish, then assembled in input order.

Parts (`part-<n>.jsonl`, one record per row: index, output, error) are written first, so whatever was
computed survives a cancel, a timeout or a crash. `finalize` turns them into the API's files: for LLM
Engine jobs one JSON list in prompt order (null where a row failed or never ran) and an
`<output>.errors.jsonl` when rows failed; for OpenAI batches an output and an error file in the store.
"""

from __future__ import annotations

import json
from typing import Any

from deployments.batch.files import FileStore
from deployments.batch.storage import JOBS_FOLDER, BatchPath, DataRoot
from deployments.batch.types import JobKind, JobSpec

PARTS_SUFFIX = ".parts"
ERRORS_SUFFIX = ".errors.jsonl"


def parts_folder(spec: JobSpec) -> BatchPath:
    root = DataRoot(spec.data_root)
    if spec.kind == JobKind.OPENAI:
        return root.internal(JOBS_FOLDER, spec.job_id)
    return root.resolve(spec.output_path + PARTS_SUFFIX, field="output_data_path")


def check_writable(location: BatchPath) -> None:
    """Create the folder and write a probe, so an unwritable output fails at create time (OSError)."""
    location.fs.makedirs(location.path, exist_ok=True)
    probe = location.child(".probe")
    probe.write_bytes(b"")
    probe.fs.rm(probe.path)


def write_part(folder: BatchPath, seq: int, records: list[dict[str, Any]]) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    folder.child(f"part-{seq:05d}.jsonl").write_bytes(lines.encode())


def read_parts(folder: BatchPath) -> dict[int, dict[str, Any]]:
    """Every record written so far, by row index."""
    if not folder.exists():
        return {}
    records: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.fs.ls(folder.path, detail=False)):
        if path.rsplit("/", 1)[-1].startswith("part-"):
            with folder.fs.open(path, "rb") as f:
                for line in f.read().decode().splitlines():
                    record = json.loads(line)
                    records[record["index"]] = record
    return records


def finalize(spec: JobSpec, num_total: int) -> tuple[str | None, str | None]:
    """Assemble the parts; returns the OpenAI output and error file ids (None for LLM Engine jobs)."""
    records = read_parts(parts_folder(spec))
    ordered = [records.get(i) for i in range(num_total)]
    outputs = [r["output"] if r else None for r in ordered]
    errors = [r["error"] for r in ordered if r and r["error"] is not None]
    if spec.kind != JobKind.OPENAI:
        root = DataRoot(spec.data_root)
        root.resolve(spec.output_path, field="output_data_path").write_bytes(json.dumps(outputs).encode())
        if errors:
            errors_path = root.resolve(spec.output_path + ERRORS_SUFFIX, field="output_data_path")
            errors_path.write_bytes("".join(json.dumps(e) + "\n" for e in errors).encode())
        return None, None
    store = FileStore(DataRoot(spec.data_root))
    lines = [o for o in outputs if o is not None]
    output_id = store.put(_jsonl(lines), f"{spec.job_id}_output.jsonl", "batch_output").id if lines else None
    error_id = store.put(_jsonl(errors), f"{spec.job_id}_error.jsonl", "batch_output").id if errors else None
    return output_id, error_id


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()
