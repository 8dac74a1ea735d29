"""Refused at create with a 400 naming the field, before anything is recorded or deployed: a model that
could never start (context, KV cache, architecture) and a checkpoint folder outside the allowed roots."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.config import REPO_ROOT, EngineSettings
from deployments.endpoints.checks import causal_lm_model_types
from engine.errors import InvalidRequestError
from tests.deployments.endpoint_fakes import INGRESS_APP, FakeServe, make_service, request

TINY_CONTEXT = 512  # tests/tiny_model.py: max_position_embeddings


@pytest.fixture
def roots(tiny_model_dir: Path, tmp_path: Path) -> dict:
    """The tiny model and a T5 (encoder-decoder) folder under one allowed root; a copy outside it."""
    allowed = tmp_path / "models"
    shutil.copytree(tiny_model_dir, allowed / "tiny")
    (allowed / "t5").mkdir()
    (allowed / "t5" / "config.json").write_text(
        json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]})
    )
    shutil.copytree(tiny_model_dir, tmp_path / "outside")
    (allowed / "link-out").symlink_to(tmp_path / "outside")
    return {"checkpoint_roots": [str(allowed)]}


async def _refused(serve_fake: FakeServe, tmp_path: Path, match: str, settings: dict, **changes) -> None:
    endpoints, _ = await make_service(tmp_path / "state", **settings)
    with pytest.raises(InvalidRequestError, match=match):
        await endpoints.create(request(**changes))
    assert serve_fake.deployed == [] and serve_fake.endpoint_apps() == set()
    assert list((tmp_path / "state" / "endpoints" / INGRESS_APP).iterdir()) == []


async def test_a_checkpoint_under_an_allowed_root_is_accepted(serve_fake: FakeServe, tmp_path, roots):
    endpoints, _ = await make_service(tmp_path / "state", **roots)
    tiny = str(tmp_path / "models" / "tiny")
    await endpoints.create(request(model_name="tiny", checkpoint_path=tiny, max_model_len=TINY_CONTEXT))
    assert [d[0] for d in serve_fake.deployed] == ["app.ep"]


@pytest.mark.parametrize(
    "path",
    ["{tmp}/outside", "{tmp}/models/link-out", "{tmp}/models/../outside", "models/tiny", "s3://bucket/tiny"],
)
async def test_checkpoints_outside_the_allowed_roots_are_400(serve_fake, tmp_path, roots, path: str):
    checkpoint = path.format(tmp=tmp_path)
    await _refused(serve_fake, tmp_path, "checkpoint_path", roots, model_name="x", checkpoint_path=checkpoint)


async def test_no_checkpoint_is_allowed_without_roots(serve_fake, tmp_path, tiny_model_dir):
    await _refused(
        serve_fake, tmp_path, "checkpoint_roots", {}, model_name="x", checkpoint_path=str(tiny_model_dir)
    )


async def test_max_model_len_over_the_models_context_is_400(serve_fake, tmp_path, roots):
    tiny = str(tmp_path / "models" / "tiny")
    match = f"max_model_len: {TINY_CONTEXT + 1} is over the context .* \\({TINY_CONTEXT} tokens\\)"
    await _refused(
        serve_fake,
        tmp_path,
        match,
        roots,
        model_name="t",
        checkpoint_path=tiny,
        max_model_len=TINY_CONTEXT + 1,
    )
    await _refused(
        serve_fake, tmp_path, "max_model_len: 100000 is over", {}, max_model_len=100_000
    )  # zoo model


async def test_a_kv_cache_that_cannot_hold_one_sequence_is_400(serve_fake, tmp_path, roots):
    # tiny: 2 layers x 2 KV heads x 16 dims x 2 (keys, values) x 4 bytes = 512 bytes per token
    engine = EngineSettings(dtype="float32", kv_cache_bytes=256 * 512 - 1)
    tiny = str(tmp_path / "models" / "tiny")
    await _refused(
        serve_fake,
        tmp_path,
        "needs 131072 bytes of KV cache .* kv_cache_bytes=131071",
        {**roots, "engine": engine},
        model_name="t",
        checkpoint_path=tiny,
        max_model_len=256,
    )


async def test_an_architecture_transformers_cannot_run_is_400(serve_fake, tmp_path, roots):
    t5 = str(tmp_path / "models" / "t5")
    await _refused(serve_fake, tmp_path, "model_type 't5'", roots, model_name="b", checkpoint_path=t5)


def test_the_causal_lm_types_read_from_source_are_transformers_own():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert causal_lm_model_types() == frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# The checks run in the endpoint controller, which loads no model: they must not import torch (~3-5 CPU-s
# and hundreds of MB per controller process). A fresh interpreter, as a controller starts.
NO_TORCH_CHECK = """
import sys
from deployments.config import ModelConfig
from deployments.endpoints.checks import check_fits
check_fits(ModelConfig(name="a", model=sys.argv[1]))
check_fits(ModelConfig(name="b", model="smollm2-135m-instruct"))  # a packaged GGUF: its converted config
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


def test_the_create_checks_import_neither_torch_nor_transformers(tiny_model_dir: Path):
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH_CHECK, str(tiny_model_dir)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "[]", done.stdout
