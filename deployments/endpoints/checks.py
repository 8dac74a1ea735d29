"""Whether a runtime endpoint's model can ever start, checked at create (400) rather than after Serve
tried its replica `max_start_attempts` times: the context length, a KV cache that holds one sequence,
an architecture that transformers can run as a causal LM (the last two for this project's engine; a
vLLM endpoint gets the context check only).

The model's config.json is read where it already is without a download: a local folder, a hub
model in the local Hugging Face cache, a packaged GGUF once converted (its first load). Where it is
not, only the context length (from the zoo) is checked here; the replica checks the rest as it starts.
Blocking (file reads): called from a worker thread.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from deployments.config import ModelConfig
from deployments.engines import resolve_engine_kind
from engine.errors import InvalidRequestError
from model_zoo import resolve
from model_zoo.errors import ModelZooError
from model_zoo.gguf_files import converted_dir, find_gguf, find_package_dir
from model_zoo.spec import ModelSource, ModelSpec

# Bytes per KV element by engine dtype; "auto" is counted at its smallest (bf16/fp16) so that only a
# cache that can never hold one sequence is refused (on a CPU without bf16 "auto" runs float32).
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


def check_fits(config: ModelConfig) -> None:
    """400 naming the knob if the model of `config` cannot start with its engine settings."""
    try:
        spec = resolve(config.model, name=config.name)
    except ModelZooError as exc:
        raise InvalidRequestError(f"model_name / checkpoint_path: {exc}") from None
    engine = config.engine
    if engine.max_model_len is not None and engine.max_model_len > spec.context_length:
        raise InvalidRequestError(
            f"max_model_len: {engine.max_model_len} is over the context of {config.model!r} "
            f"({spec.context_length} tokens)"
        )
    hf_config = _hf_config(spec)
    if hf_config is None or resolve_engine_kind(config) == "vllm":
        return  # vLLM sizes its own KV cache and knows its own architectures: it checks them at start
    _check_architecture(hf_config, config.model)
    max_model_len = engine.max_model_len or spec.context_length
    needed = _kv_bytes_per_token(hf_config) * _DTYPE_BYTES[engine.dtype]
    needed *= math.ceil(max_model_len / engine.block_size) * engine.block_size
    if needed > engine.kv_cache_bytes:
        raise InvalidRequestError(
            f"max_model_len: one sequence of {max_model_len} tokens needs {needed} bytes of KV cache "
            f"({engine.dtype}), more than kv_cache_bytes={engine.kv_cache_bytes} (endpoints.engine); "
            "ask for a smaller max_model_len"
        )


def _check_architecture(hf_config: dict[str, Any], model: str) -> None:
    model_type = hf_config.get("model_type")
    if model_type not in causal_lm_model_types():
        raise InvalidRequestError(
            f"checkpoint_path: {model!r} has model_type {model_type!r} (architectures "
            f"{hf_config.get('architectures')}), which transformers cannot run as a causal language model"
        )


_CAUSAL_LM_TABLE = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"


@functools.cache
def causal_lm_model_types() -> frozenset[str]:
    """The model types transformers runs as causal language models (its MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    read from the source of transformers' modeling_auto.py: importing that module imports torch, ~3 CPU-s
    and hundreds of MB in the endpoint controller, which loads no model. Imported only where the source
    does not hold the table as a literal (another transformers version)."""
    found = importlib.util.find_spec("transformers")  # finds the package without importing it
    if found is not None and found.origin is not None:
        source = Path(found.origin).parent / "models" / "auto" / "modeling_auto.py"
        with contextlib.suppress(OSError, SyntaxError, ValueError, TypeError, IndexError, AttributeError):
            for node in ast.parse(source.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.Assign) and any(
                    getattr(t, "id", None) == _CAUSAL_LM_TABLE for t in node.targets
                ):
                    return frozenset(name for name, _ in ast.literal_eval(node.value.args[0]))
    from transformers.models.auto import modeling_auto

    return frozenset(getattr(modeling_auto, _CAUSAL_LM_TABLE))


def _kv_bytes_per_token(hf_config: dict[str, Any]) -> int:
    """KV elements one token takes over all layers (keys and values), as engine/kv_cache.py lays them."""
    text = hf_config.get("text_config") or hf_config
    try:
        num_heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // num_heads)
        num_kv_heads = int(text.get("num_key_value_heads") or num_heads)
        return 2 * int(text["num_hidden_layers"]) * num_kv_heads * head_dim
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0  # a config without these: the replica's own check decides


def _hf_config(spec: ModelSpec) -> dict[str, Any] | None:
    path = _config_path(spec)
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _config_path(spec: ModelSpec) -> Path | None:
    try:
        if spec.source == ModelSource.local:
            return Path(spec.location) / "config.json"
        if spec.source == ModelSource.hub:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec.location, "config.json")
            return Path(cached) if isinstance(cached, str) else None
        if spec.source == ModelSource.packaged_gguf:
            gguf = find_gguf(find_package_dir(spec.location), spec.gguf_file)
            return converted_dir(spec.name, gguf) / "config.json"
    except (ModelZooError, OSError, ValueError):
        return None
    return None  # an assembled GGUF: assembled and converted at its first load
