"""A tiny random-weight Llama with a real byte-level BPE tokenizer, built in about a second for tests."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"  # id 0
BOS_TOKEN = "<|im_start|>"  # id 1; never added automatically, as in SmolLM2 and other ChatML models
EOS_TOKEN = "<|im_end|>"  # id 2
VOCAB_SIZE = 400

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Non-ASCII lines make sure multi-byte characters (2, 3 and 4 bytes in UTF-8) exist in tests.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little model that wanted to write stories.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "What is the capital of France? Tell me a story about a cat and a dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "def add(a, b):\n    return a + b\n",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells.",
    "A café serves crème brûlée to a naïve customer at the façade.",
    "日本語のテキストです。東京は日本の首都です。",
    "Emoji time: 😀 🎉 🚀 👍 and more 😀😀.",
    "Ünïcödé strings: Ελληνικά, русский, العربية, עברית.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the built-in corpus; special tokens take ids 0, 1 and 2."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHATML_TEMPLATE,
        model_max_length=512,
    )


def tiny_dims(tokenizer: PreTrainedTokenizerFast, head_dim: int = 16) -> dict:
    """The tiny test models' vocabulary, sizes and special ids: config keywords every decoder shares.
    vLLM's CPU attention takes head_dim 32 and up (tests/deployments/engines use 32)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 4 * head_dim,
        "intermediate_size": 8 * head_dim,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": head_dim,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_model(path: Path, eos_bias: float = 0.0, head_dim: int = 16) -> Path:
    """Save a deterministic tiny Llama (float32) and its tokenizer into `path`; returns `path`.

    Greedy output is noise; EOS comes only by chance (never as the first token on the test prompts).
    `eos_bias` > 0 multiplies lm_head's EOS row by (1 + eos_bias) (Llama has no lm_head bias), so EOS
    wins the argmax far more often: with 5.0, greedy output ends within about 3 tokens.
    """
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **tiny_dims(tokenizer, head_dim),
        num_hidden_layers=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    if eos_bias:
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] *= 1.0 + eos_bias
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
