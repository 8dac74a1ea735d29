"""Typed values passed between the engine's stages and to its callers."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.errors import ServingError
from engine.guided_spec import GuidedSpec


class FinishReason(StrEnum):
    STOP = "stop"  # EOS or a stop sequence
    LENGTH = "length"  # max_new_tokens or the context limit
    ABORT = "abort"  # the caller went away
    ERROR = "error"  # this request failed; TokenDelta.error says why (other requests go on)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request generation settings. Values are already validated by the protocol layer."""

    max_new_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 = off
    top_p: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_sequences: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    return_log_probs: bool = False
    num_top_logprobs: int = 0  # with return_log_probs: the most likely alternatives of each position
    skip_special_tokens: bool = True
    seed: int | None = None  # any int; reduced modulo 2**64 (engine.params)
    ignore_eos: bool = False  # benchmarks force a fixed number of tokens
    guided: GuidedSpec | None = None  # the output must follow this JSON schema / regex / choice / grammar

    @property
    def is_greedy(self) -> bool:
        # As vLLM: below 1e-5 a temperature only magnifies float error (1e-40 is subnormal in float32,
        # 1e-46 rounds to 0), so it means "greedy". `not >=` also catches NaN.
        return not self.temperature >= GREEDY_TEMPERATURE_EPS


GREEDY_TEMPERATURE_EPS = 1e-5
MAX_TOP_LOGPROBS = 20  # alternatives per position (OpenAI chat's own limit)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class TokenLogProb:
    token_id: int
    text: str  # the token decoded on its own
    log_prob: float  # log probability under the model's raw distribution (<= 0)
    top: tuple[TokenLogProb, ...] = ()  # the position's most likely tokens, best first (num_top_logprobs)


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """What one engine step produced for one request: new text and, on the last one, the finish."""

    request_id: str
    text: str  # newly released text; may be "" while text is held back (partial UTF-8 or stop prefix)
    num_prompt_tokens: int
    num_completion_tokens: int  # running total
    token: TokenLogProb | None = None  # set when log probs were asked for
    finish_reason: FinishReason | None = None
    queue_time_s: float | None = None  # on the first delta: from arrival to first scheduled
    error: ServingError | None = None  # with FinishReason.ERROR: why this request failed

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1 of the KV-cache blocks in use
    max_model_len: int
    num_preemptions: int = 0  # since start: running sequences sent back to recompute (KV cache full)
    prefix_cache_queries: int = 0  # since start: prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # since start: of those, tokens found cached
    # since start: steps and their wall time, decode-only ones and those that fed a prompt chunk (0 from
    # engines that do not count them), and the time the next step was held for refills (engine/refill.py)
    num_decode_steps: int = 0
    num_prefill_steps: int = 0
    decode_step_time_s: float = 0.0
    prefill_step_time_s: float = 0.0
    refill_hold_time_s: float = 0.0


@dataclass(slots=True)
class StepTotals:
    """An engine's steps since start, by kind: decode only, or feeding some sequence a prompt chunk."""

    num_decode_steps: int = 0
    num_prefill_steps: int = 0
    decode_step_time_s: float = 0.0
    prefill_step_time_s: float = 0.0

    def add(self, *, is_prefill: bool, seconds: float) -> None:
        if is_prefill:
            self.num_prefill_steps += 1
            self.prefill_step_time_s += seconds
        else:
            self.num_decode_steps += 1
            self.decode_step_time_s += seconds


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Limits and knobs of one engine; sized once at start-up."""

    max_num_seqs: int = 16  # sequences decoded together
    max_model_len: int = 2048  # prompt + generated tokens per sequence
    max_num_batched_tokens: int = 256  # tokens per forward pass (decode + prefill chunks)
    kv_cache_bytes: int = 512 * 1024**2  # memory budget of the paged KV cache
    block_size: int = 16  # tokens per KV-cache block
    dtype: str = "bfloat16"  # "float32" | "bfloat16" | "float16" | "auto"
    device: str = "auto"  # "auto" = cuda if available else cpu
    num_threads: int | None = None  # torch threads on CPU; None = every core this process may use
    max_waiting: int = 256  # requests queued in the engine before new ones are refused (429)
    # after a step that finished requests, wait up to this long for their closed-loop replacements before
    # the next step, while recent finishes were followed by new requests (engine/refill.py); 0 = never.
    # Off by default: through HTTP it gave c=16 a lower TTFT and cost c=32/64 some throughput (docs/engine.md)
    refill_wait_ms: float = 0.0
    guided_compile_timeout_s: float = 10.0  # a grammar that takes longer to compile is refused (400)
    optimize_model: bool = True  # fuse q/k/v and gate/up products, prepack CPU weights for oneDNN
    native_attention: bool = True  # CPU attention, decode and prefill, in C (engine/native_attention.py)
    native_linear: bool = True  # CPU bf16 products in the C kernel (engine/native_linear.py), else oneDNN
    # bf16 CPU products with int8 weights and int8 rows (a scale per group of 32 inputs) on the C kernel of
    # engine/native_int8.py: ~2x the bf16 kernel where the CPU has AVX512-VNNI but no bf16 dot product;
    # the lm head stays bf16 unless int8_lm_head (~0.89x a step more on an Ice Lake, greedy text departs
    # from bf16's sooner: docs/engine.md)
    int8_weights: bool = False
    int8_lm_head: bool = False
    native_norm: bool = True  # the fast forward's bf16 CPU RMSNorms in C, same bits (engine/native_norm.py)
    native_rotary: bool = True  # its bf16 CPU rotary + KV-cache write in C, same bits (native_rotary.py)
    native_argmax: bool = True  # greedy picks over CPU logits in C, torch's index (native_argmax.py)
    # the fast forward's SiLU-gated MLPs: SiLU and the multiply inside the bf16 gate/up product's C kernel,
    # torch's bits (engine/native_linear.py)
    native_silu: bool = True
    # and their residual adds inside the o_proj and down products' C kernel, torch's bits
    native_residual: bool = True
    # the fast forward's Llama-like layers with every part in C as one sequence of C calls whose constant
    # arguments are read once (engine/native_layers.py): the same bits, less Python a layer
    native_layers: bool = True
    # CPU packed weights and KV cache on transparent huge pages where Linux gives them (engine/huge_pages.py)
    huge_pages: bool = True
    fast_forward: bool = True  # Llama/Mistral/Gemma 3 skip transformers' module tree (engine/fast_forward.py)
    enable_prefix_caching: bool = True  # reuse the KV blocks of shared prefixes (docs/kv_cache.md)
    # A forward that fails for one sequence alone fails that request; this many such failures in a row,
    # with no successful forward between them, mean a broken device: the engine declares itself dead.
    max_consecutive_failures: int = 3
