"""The facts the server needs about one model: where its weights come from and how to prompt it."""

from dataclasses import dataclass
from enum import StrEnum


class ModelSource(StrEnum):
    """Where a model's weights come from; `ModelSpec.location` is read according to it."""

    hub = "hub"  # location is a Hugging Face repo id
    local = "local"  # location is a folder in Hugging Face layout (config.json, weights, tokenizer)
    packaged_gguf = "packaged_gguf"  # location is an installed Python package whose folder holds a GGUF
    # location is an installed package that assembles a GGUF from chunk packages (model_zoo.assembled)
    assembled_gguf = "assembled_gguf"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One servable model: served name, weight source, context length and recommended hardware."""

    name: str
    source: ModelSource
    location: str
    gguf_file: str | None  # packaged_gguf: file inside the package folder; None = the only *.gguf there
    context_length: int
    # Instruct models answer a raw completion prompt as a user turn, as Ollama's generate endpoint does.
    use_chat_template: bool
    num_gpus: int  # recommended GPUs; 0 = runs on CPU
    gpu_type: str  # LLM Engine GPU names, e.g. "nvidia-ampere-a10"; "" when num_gpus is 0
    description: str
    license_note: str = ""
