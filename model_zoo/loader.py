"""Load a model and its tokenizer from the hub, a local folder or a packaged (or assembled) GGUF."""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from model_zoo.assembled import assembled_gguf
from model_zoo.errors import ModelZooError
from model_zoo.gguf_cache import ensure_converted
from model_zoo.gguf_files import converted_dir, default_cache_dir, find_gguf, find_package_dir
from model_zoo.spec import ModelSource, ModelSpec

logger = logging.getLogger("model_zoo")


@dataclass(slots=True)
class LoadedModel:
    """A model in eval mode on its device, with its tokenizer and how long loading took."""

    spec: ModelSpec
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    load_time_s: float


Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]
SourceLoader = Callable[[ModelSpec, torch.dtype, Path | None], Loaded]


def load_model(
    spec: ModelSpec,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load `spec`'s weights in `dtype` onto `device`; `cache_dir` holds converted GGUF folders."""
    start = time.perf_counter()
    logger.info("loading %s from %s %s (%s, %s)", spec.name, spec.source, spec.location, dtype, device)
    model, tokenizer = _SOURCE_LOADERS[spec.source](spec, dtype, cache_dir)
    model = model.to(device)
    model.eval()
    load_time_s = time.perf_counter() - start
    logger.info(
        "loaded %s from %s %s in %.1f s (%s, %s)",
        spec.name,
        spec.source,
        spec.location,
        load_time_s,
        dtype,
        device,
    )
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, load_time_s=load_time_s)


def _load_folder(folder: str | Path, dtype: torch.dtype) -> Loaded:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, tokenizer


def _load_hub(spec: ModelSpec, dtype: torch.dtype, cache_dir: Path | None) -> Loaded:
    try:
        return _load_folder(spec.location, dtype)
    except OSError as exc:
        # transformers reports an unreachable hub, a gated repo and missing files all as OSError.
        raise ModelZooError(
            f"cannot load {spec.name!r} from the Hugging Face repo {spec.location!r}: the weights must be "
            f"in the local HF cache or the hub must be reachable (and the repo's license accepted, with "
            f"HF_TOKEN set, for gated repos); cause: {exc}"
        ) from exc


def _load_local(spec: ModelSpec, dtype: torch.dtype, cache_dir: Path | None) -> Loaded:
    folder = Path(spec.location).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelZooError(
            f"cannot load {spec.name!r}: the local folder {folder} does not exist or has no config.json"
        )
    return _load_folder(folder, dtype)


def _load_packaged_gguf(spec: ModelSpec, dtype: torch.dtype, cache_dir: Path | None) -> Loaded:
    gguf_path = find_gguf(find_package_dir(spec.location), spec.gguf_file)
    folder = ensure_converted(gguf_path, converted_dir(spec.name, gguf_path, cache_dir))
    return _load_folder(folder, dtype)


def _load_assembled_gguf(spec: ModelSpec, dtype: torch.dtype, cache_dir: Path | None) -> Loaded:
    gguf_path = assembled_gguf(spec.location, cache_dir or default_cache_dir())
    folder = ensure_converted(gguf_path, converted_dir(spec.name, gguf_path, cache_dir))
    return _load_folder(folder, dtype)


_SOURCE_LOADERS: dict[ModelSource, SourceLoader] = {
    ModelSource.hub: _load_hub,
    ModelSource.local: _load_local,
    ModelSource.packaged_gguf: _load_packaged_gguf,
    ModelSource.assembled_gguf: _load_assembled_gguf,
}
