"""How much calibration data a training-free split needs: Gemma 3 270M split 8/4 calibrated on more and more tokens.

    python examples/gemma3_calibration.py                   # needs the `gguf` extra; docs/gemma3_calibration.{json,md}
    python examples/gemma3_calibration.py --windows 16 64 128 --steps 200 800

Gemma 3 270M split into 8 experts, top-4, with the calibrated defaults (shared groups chosen per layer, coactivation
clusters, calibrated routers, compensation, distillation), calibrated on --windows windows of 256 tokens of training
prose (the half of it examples/gemma3_optimize.py calibrates on; BOS first) with `calibration_tokens` holding every
one of them, for each --steps of distillation per layer; perplexity on held-out prose (standard-library docstrings)
and code (standard-library source), 8 windows of 256 tokens each, beside the dense model, with the time of each
conversion and the process's peak memory after it and its evaluation. 2 threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

import moe_compile as mc
from moe_compile.example_text import calibration_batches, perplexity, stdlib_prose, stdlib_text, token_ids
from moe_compile.table import format_table

from gemma3 import fetch, load  # examples/gemma3.py, beside this script

DOCS = Path(__file__).resolve().parent.parent / "docs"
LENGTH, EVAL_WINDOWS = 256, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[16, 64], help="calibration windows (16 64)")
    parser.add_argument("--steps", type=int, nargs="+", default=[200], help="distillation steps per layer (200)")
    args = parser.parse_args()
    dense, tokenizer = load(fetch())
    bos = tokenizer.bos_token_id
    prose = token_ids(stdlib_prose("train"), tokenizer)
    texts = {"prose": token_ids(stdlib_prose("validation"), tokenizer),
             "code": token_ids(stdlib_text("validation"), tokenizer)}

    def measure(model) -> dict:
        return {text: perplexity(model, ids, length=LENGTH, max_windows=EVAL_WINDOWS, bos=bos)
                for text, ids in texts.items()}

    rows = [{"tokens": 0, "steps": 0, "seconds": None, **measure(dense)}]
    for windows in args.windows:
        calibration = calibration_batches(LENGTH, windows, batch_size=4, data=prose[:len(prose) // 2], bos=bos)
        for steps in args.steps:
            config = mc.MoEConfig(experts="split", num_experts=8, top_k=4, distill_steps=steps,
                                  calibration_tokens=windows * LENGTH)
            start = time.perf_counter()
            split = mc.convert(dense, config, calibration_data=calibration, progress=False)
            seconds = time.perf_counter() - start
            rows.append({"tokens": windows * LENGTH, "steps": steps, "seconds": seconds, **measure(split),
                         "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            print(rows[-1], flush=True)
            del split
    result = {"command": " ".join(sys.argv[1:]), "rows": rows,
              "machine": {"threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    (DOCS / "gemma3_calibration.json").write_text(json.dumps(result, indent=1) + "\n")
    print(write_doc(result))


def write_doc(result: dict) -> str:
    dense, rows = result["rows"][0], result["rows"][1:]
    table = [("calibration tokens", "distillation steps", "convert", "prose ppl", "vs dense", "code ppl", "vs dense",
              "peak memory")]
    table.append(("dense", "-", "-", f"{dense['prose']:.2f}", "1.00x", f"{dense['code']:.2f}", "1.00x", "-"))
    table += [(f"{r['tokens']:,}", str(r["steps"]), f"{r['seconds']:.0f} s", f"{r['prose']:.2f}",
               f"{r['prose'] / dense['prose']:.2f}x", f"{r['code']:.2f}", f"{r['code'] / dense['code']:.2f}x",
               f"{r['peak_memory_mb'] / 1024:.1f} GiB") for r in rows]
    machine = result["machine"]
    text = f"""# How much calibration data a training-free split needs (Gemma 3 270M, split 8/4)

```
python examples/gemma3_calibration.py {result['command']}
```

{machine['threads']} threads, torch {machine['torch']}. Split 8/4 with the calibrated defaults, `calibration_tokens`
holding every calibration token (windows of 256 tokens of training prose, BOS first); held-out prose and code, 8
windows of 256 tokens each. Peak memory: the process's, after each conversion and its evaluation (so it never
falls).

```
{format_table(table)}
```
"""
    (DOCS / "gemma3_calibration.md").write_text(text)
    return text


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
