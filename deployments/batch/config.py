"""The app config's `batch:` section: where batch files live, how big uploads may be, how many workers."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_DATA_ROOT = "/tmp/llmserve-batch"


class BatchSettings(BaseModel):
    """Batch jobs read and write only under `data_root`; each engine worker is one Ray Data actor."""

    model_config = ConfigDict(extra="forbid")

    data_root: str = Field(
        DEFAULT_DATA_ROOT,
        min_length=1,
        description="Folder or fsspec URL (file://, s3://...) under which every batch input and output lies; "
        "uploaded files are kept in its files/ folder, OpenAI batches' parts in jobs/ and job records in "
        "state/ (no request path may name these three). Shared storage on multi-node clusters.",
    )
    max_upload_bytes: int = Field(
        256 * 1024**2, ge=1024, description="Largest file accepted by POST /v1/files (413 beyond)."
    )
    max_concurrent_uploads: int = Field(
        4,
        ge=1,
        le=1024,
        description="Uploads (POST /v1/files) in progress at once in one ingress replica; past it 429 at "
        "once, before the body is read. Each streams to storage holding at most 1 MiB of its body.",
    )
    max_data_parallelism: int = Field(
        4, ge=1, le=64, description="Most engine workers one job may ask for (data_parallelism)."
    )
    max_worker_crashes: int = Field(
        16,
        ge=0,
        description="Ray Data batches of one job whose engine worker died (a crash, out of memory) before "
        "the job fails. The rows of such a batch run again, each alone and without retries: a row whose "
        "worker dies again fails alone, the others complete.",
    )
    worker_num_cpus: float = Field(
        0.1,
        gt=0,
        description="Logical CPUs reserved by each engine worker (its Ray Data actor). It reserves "
        "scheduling room only (0.1 fits a worker next to the default app on 2 CPUs); what a worker "
        "uses is bounded by worker_num_threads and yields to online replicas through worker_nice. "
        "Raise it on clusters to keep batch workers off nodes that online replicas need.",
    )
    worker_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each engine worker.")
    worker_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="OS niceness added to each worker process, so online replicas on the same node "
        "get the CPU first.",
    )
    worker_idle_priority: bool = Field(
        False,
        description="Linux: run each worker under SCHED_IDLE, so it only gets CPU time that nothing else "
        "on the node wants (stronger than worker_nice; on a busy node a batch then barely moves).",
    )
    worker_num_threads: int | None = Field(
        1, ge=1, description="Torch threads per worker on CPU; null = the model's engine setting."
    )
    batch_size: int = Field(
        32, ge=1, description="Prompts per Ray Data batch handed to one worker (and per progress step)."
    )
    max_running_jobs: int = Field(
        2,
        ge=1,
        description="Jobs running at once; later ones wait, status queued, in creation order. A job also "
        "waits (queued) until the cluster's free resources place all its workers.",
    )
    max_jobs_kept: int = Field(
        1000, ge=1, description="Finished jobs kept (their records under data_root/state/); the oldest go."
    )
