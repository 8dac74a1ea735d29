"""Model names → weights. Loading lives in `model_zoo.loader` (imported on its own: it pulls in torch)."""

from model_zoo.catalogue import CATALOGUE, DEFAULT_MODEL, has_chat_template, local_spec, resolve
from model_zoo.errors import ModelZooError
from model_zoo.spec import ModelSource, ModelSpec

__all__ = [
    "CATALOGUE",
    "DEFAULT_MODEL",
    "ModelSource",
    "ModelSpec",
    "ModelZooError",
    "has_chat_template",
    "local_spec",
    "resolve",
]
