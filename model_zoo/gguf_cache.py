"""Convert a GGUF shipped inside a Python package once into a plain Hugging Face folder (where both lie:
model_zoo/gguf_files.py).

Loading a GGUF through transformers dequantizes every tensor (15-30 s); the converted folder loads in
about a second, so every replica after the first starts fast.
"""

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger("model_zoo")

Converter = Callable[[Path, Path], None]  # (gguf file, empty output folder) -> None


def ensure_converted(gguf_path: Path, target: Path, convert: Converter | None = None) -> Path:
    """Convert `gguf_path` into `target` unless done already; concurrent callers never see half a folder,
    and wait for one conversion instead of each doing its own (a file lock beside the target)."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if (target / "config.json").is_file():  # converted by the process that held the lock
            return target
        return _convert_into(gguf_path, target, convert or convert_gguf)


def _convert_into(gguf_path: Path, target: Path, convert: Converter) -> Path:
    # Build next to the target so the final rename stays on one file system and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by several users
    logger.info("converting %s to %s (one time, 5-60 s)", gguf_path, target)
    start = time.perf_counter()
    try:
        convert(gguf_path, tmp)
        os.rename(tmp, target)
    except OSError:
        # rename fails when another replica finished first: keep its folder, drop ours.
        if not (target / "config.json").is_file():
            raise
        logger.info("%s was converted meanwhile by another process; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", gguf_path.name, time.perf_counter() - start)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF through transformers and save it as float32 safetensors plus its tokenizer."""
    folder, name = gguf_path.parent, gguf_path.name
    with parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers refuses to save a model it still marks as GGUF-quantized; the weights are plain now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # the chat template is saved as chat_template.jinja


@contextmanager
def parsed_once() -> Iterator[None]:
    """Within the block, every `gguf.GGUFReader(path)` returns one shared reader per file, and every
    `gguf.get_tensor_name_map(arch, n_blocks)` one shared map per model.

    transformers opens the GGUF three times for one conversion (tokenizer, config, weights), and each
    `GGUFReader` parses the whole metadata into numpy views: Gemma 3's 262k-string vocabulary takes
    ~15 s a time on one core. The reader is read-only (a memory map), so sharing it is safe; transformers
    looks `gguf.GGUFReader` up at each call, so replacing the module's attribute reaches it. Conversions
    enter the block one thread at a time, so a swap is always undone to the real class. `gguf` is imported
    here, not at the top: only a conversion uses it, and every replica start imports this module.

    The shared reader also parses over a plain array: `GGUFReader` slices its `np.memmap` once per
    string part (12.8M slices for Gemma 3's vocabulary), and each memmap slice runs numpy's Python-level
    `memmap.__getitem__` and `__array_finalize__`; a plain `ndarray` view of the same mapping slices in C,
    with the same fields and tensors (Gemma 3: 11.5 s -> 3.8 s).

    transformers builds gguf's tensor-name map (every known tensor name of the architecture for every
    block) once per module of the model while it maps the weights: 313 times for Gemma 3, ~1.5 s. The map
    is only read, so one per (architecture, number of blocks) serves them all.
    """
    import gguf
    import numpy as np
    from gguf.gguf_reader import GGUFReader

    class PlainArrayReader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:  # GGUFReader.__init__ sets its np.memmap here
            self._plain_data = value.view(np.ndarray)  # keeps the mapping alive as its base

    with _GGUF_SWAP:
        original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple[str, str], gguf.GGUFReader] = {}

        def shared_reader(path: os.PathLike | str, mode: str = "r") -> gguf.GGUFReader:
            key = (os.fspath(path), mode)
            if key not in readers:
                readers[key] = PlainArrayReader(path, mode)
            return readers[key]

        gguf.GGUFReader = shared_reader
        gguf.get_tensor_name_map = functools.cache(original_name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


_GGUF_SWAP = threading.Lock()
