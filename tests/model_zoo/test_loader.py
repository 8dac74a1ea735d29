"""`load_model` on the tiny model, its errors, and (slow) the real packaged SmolLM2."""

import dataclasses
import logging
from pathlib import Path

import gguf
import pytest
import torch
from gguf.gguf_reader import GGUFReader

from model_zoo import DEFAULT_MODEL, ModelZooError, loader, resolve
from model_zoo.loader import LoadedModel, load_model
from tests.tiny_model import build_tiny_model


def test_loads_a_local_folder(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    spec = resolve(str(tiny_model_dir))
    with caplog.at_level(logging.INFO, logger="model_zoo"):
        loaded = load_model(spec, dtype=torch.bfloat16)
    assert isinstance(loaded, LoadedModel) and loaded.spec == spec
    assert loaded.model.dtype == torch.bfloat16 and not loaded.model.training
    assert loaded.model.device.type == "cpu"
    assert loaded.tokenizer.eos_token_id == loaded.model.config.eos_token_id
    assert loaded.load_time_s > 0
    assert f"loaded {spec.name} from local" in caplog.text


def test_tiny_tokenizer_round_trips_multibyte_text(tiny_model_dir: Path) -> None:
    tokenizer = load_model(resolve(str(tiny_model_dir)), dtype=torch.float32).tokenizer
    text = "café naïve 日本語 😀"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def _greedy(loaded: LoadedModel, text: str, max_new_tokens: int) -> list[int]:
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    out = loaded.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_tiny_model_is_deterministic_and_eos_is_not_immediate(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = load_model(resolve(str(tiny_model_dir)), dtype=torch.float32)
    again = load_model(resolve(str(build_tiny_model(tmp_path / "again"))), dtype=torch.float32)
    for text in ("Hello, world", "The capital of France is", "café 😀"):
        tokens = _greedy(first, text, 8)
        assert tokens[0] != first.tokenizer.eos_token_id
        assert tokens == _greedy(again, text, 8)


def test_eos_bias_ends_generations_early(tmp_path: Path) -> None:
    loaded = load_model(resolve(str(build_tiny_model(tmp_path, eos_bias=5.0))), dtype=torch.float32)
    for text in ("Hello, world", "The capital of France is", "café 😀"):
        assert loaded.tokenizer.eos_token_id in _greedy(loaded, text, 4)


def test_missing_local_folder_names_the_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = resolve(str(tiny_model_dir))
    moved = dataclasses.replace(spec, location=str(tmp_path / "gone"))
    with pytest.raises(ModelZooError, match="gone"):
        load_model(moved, dtype=torch.float32)


def test_unreachable_hub_names_the_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(loader.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelZooError, match=r"meta-llama/Llama-2-7b-hf.*HF cache"):
        load_model(resolve("llama-2-7b"), dtype=torch.float32)


@pytest.mark.slow
def test_packaged_smollm2_converts_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []
    real_build_fields = GGUFReader._build_fields

    def counting_build_fields(reader, offs, count):
        parsed.append(type(reader).__name__)
        return real_build_fields(reader, offs, count)

    monkeypatch.setattr(GGUFReader, "_build_fields", counting_build_fields)
    loaded = load_model(resolve(DEFAULT_MODEL), dtype=torch.float32, cache_dir=tmp_path)
    # transformers opens the file for the tokenizer, the config and the weights: one parse serves all,
    # over a plain array (model_zoo/gguf_cache.py: parsed_once)
    assert parsed == ["PlainArrayReader"], f"one conversion parsed the GGUF {len(parsed)} times: {parsed}"
    assert gguf.GGUFReader is GGUFReader  # the swaps were undone
    assert gguf.get_tensor_name_map is gguf.tensor_mapping.get_tensor_name_map
    (converted,) = [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert converted.name.startswith(f"{DEFAULT_MODEL}-")
    tokenizer = loaded.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = loaded.model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    def convert_again(gguf_path, out_dir):
        raise AssertionError(f"converted {gguf_path.name} again instead of reusing {converted}")

    monkeypatch.setattr("model_zoo.gguf_cache.convert_gguf", convert_again)
    reloaded = load_model(resolve(DEFAULT_MODEL), dtype=torch.float32, cache_dir=tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [converted]  # reused
    assert reloaded.model.config.num_hidden_layers == loaded.model.config.num_hidden_layers
