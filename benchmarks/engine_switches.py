"""The engine's A/B switches as command-line flags, shared by engine_bench.py and step_profile.py:
each `--no-<field>` turns off one `EngineConfig` field that is on by default, each `--<field>` turns on
one that is off by default."""

from __future__ import annotations

import argparse

# EngineConfig field -> what turning it off runs instead
SWITCHES = {
    "fast_forward": "transformers' modules even for Llama",
    "native_linear": "bf16 products on oneDNN, not the C kernel",
    "native_norm": "torch's RMSNorm ops, not the C kernel",
    "native_rotary": "torch's rotary ops and cache writes, not the C kernel",
    "native_argmax": "torch's argmax for greedy picks, not the C kernel",
    "native_silu": "torch's SiLU and multiply after the gate/up product, not inside its C kernel",
    "native_residual": "torch's residual adds after the o_proj and down products, not inside their kernel",
    "native_layers": "each kernel of a Llama layer through its Python wrapper, not one resolved sequence",
    "huge_pages": "the packed weights and the KV cache on ordinary pages, not advised for huge pages",
}
OPT_IN = {  # EngineConfig field (off by default) -> what turning it on runs
    "int8_weights": "bf16 products with int8 weights and rows (engine/native_int8.py)",
    "int8_lm_head": "with --int8-weights, the lm head's product in int8 too",
}


def add_switch_flags(parser: argparse.ArgumentParser) -> None:
    for field, instead in SWITCHES.items():
        flag = "--no-" + field.replace("_", "-")
        parser.add_argument(flag, action="store_true", help=f"{instead} (A/B)")
    for field, instead in OPT_IN.items():
        parser.add_argument("--" + field.replace("_", "-"), action="store_true", help=f"{instead} (A/B)")


def switches(args: argparse.Namespace) -> dict[str, bool]:
    """EngineConfig keyword arguments from the parsed flags."""
    return {field: not getattr(args, f"no_{field}") for field in SWITCHES} | {
        field: getattr(args, field) for field in OPT_IN
    }
