"""Weight-only int4 / int8 experts on a real pretrained LLM: what rounding costs Gemma 3 270M's split experts.

    python examples/gemma3_int4.py                    # needs the `gguf` extra; writes docs/gemma3_int4.{json,md}
    python examples/gemma3_int4.py --model DIR        # start from a saved split model (e.g. gemma3_optimize's uniform)

Gemma 3 270M split into 8 experts, top-4 (calibrated defaults on 4,096 tokens of training prose, as
examples/gemma3_healing.py does), then `quantize_experts` at 4 bits (blocks of 32 and 128 weights per scale) and
8 bits (blocks of 32): perplexity on held-out prose (standard-library docstrings) and code (standard-library
source), 8 windows of 256 tokens each, BOS first, beside the dense model and the float32 split model. The eager
model keeps the dequantised weights, so its perplexity is what the export computes; the transformer body of the
int4 model (no LM head) is exported (target portable) and checked against eager on a real prompt, to show the
MatMulNBits graph equal to it on real weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import moe_compile as mc
from moe_compile.example_text import calibration_batches, perplexity, stdlib_prose, stdlib_text, token_ids
from moe_compile.table import format_table

from gemma3 import fetch, load  # examples/gemma3.py, beside this script

DOCS = Path(__file__).resolve().parent.parent / "docs"
LENGTH, EVAL_WINDOWS, CALIBRATION_WINDOWS = 256, 8, 16
ROUNDINGS = [(4, 32), (4, 128), (8, 32)]  # (bits, weights per scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a saved split model of Gemma 3 270M (default: convert 8/4)")
    args = parser.parse_args()
    dense, tokenizer = load(fetch())
    bos = tokenizer.bos_token_id
    texts = {"prose": token_ids(stdlib_prose("validation"), tokenizer),
             "code": token_ids(stdlib_text("validation"), tokenizer)}
    if args.model:
        split = mc.load(args.model)
    else:
        calibration = calibration_batches(LENGTH, CALIBRATION_WINDOWS, batch_size=4, bos=bos,
                                          data=token_ids(stdlib_prose("train"), tokenizer))
        split = mc.convert(dense, mc.MoEConfig(experts="split", num_experts=8, top_k=4), calibration_data=calibration,
                           progress=False)
    models = {"dense": dense, "split 8/4, float32 experts": split}
    for bits, block in ROUNDINGS:
        models[f"split 8/4, int{bits} experts, blocks of {block}"] = mc.quantize_experts(
            copy.deepcopy(split), bits=bits, block_size=block)
    rows = []
    for name, model in models.items():
        start = time.perf_counter()
        row = {"model": name, **{text: perplexity(model, ids, length=LENGTH, max_windows=EVAL_WINDOWS, bos=bos)
                                 for text, ids in texts.items()}}
        rows.append(row)
        print(f"{name}: prose {row['prose']:.2f}, code {row['code']:.2f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    int4 = models["split 8/4, int4 experts, blocks of 32"]
    prompt = torch.cat([torch.tensor([[bos]]), texts["prose"][:255].view(1, -1)], dim=1)
    with tempfile.TemporaryDirectory() as workdir:
        report = mc.export(int4.model, (prompt,), Path(workdir) / "body.onnx")
        parity = mc.check_parity(int4.model, Path(workdir) / "body.onnx", (prompt,))
    print(report.table(), parity.table(), sep="\n\n")
    result = {"command": " ".join(sys.argv[1:]), "rows": rows, "export": report.to_dict(), "parity": parity.to_dict()}
    (DOCS / "gemma3_int4.json").write_text(json.dumps(result, indent=1) + "\n")
    (DOCS / "gemma3_int4.md").write_text(write_doc(result, parity.table()))
    print((DOCS / "gemma3_int4.md").read_text())


def write_doc(result: dict, parity_table: str) -> str:
    rows, dense = result["rows"], result["rows"][0]
    split = rows[1]
    table = [("model", "prose ppl", "vs dense", "vs float32 split", "code ppl", "vs dense", "vs float32 split")]
    table += [(r["model"], f"{r['prose']:.2f}", f"{r['prose'] / dense['prose']:.3f}x",
               f"{r['prose'] / split['prose']:.3f}x", f"{r['code']:.2f}", f"{r['code'] / dense['code']:.3f}x",
               f"{r['code'] / split['code']:.3f}x") for r in rows]
    return f"""# Weight-only int4 / int8 experts on Gemma 3 270M

```
python examples/gemma3_int4.py {result['command']}
```

Split 8/4 (calibrated defaults), its routed experts rounded by `moe_compile.quantize_experts` (symmetric, one
scale per block of weights along each matrix's input); routers, attention, embeddings and the LM head stay float32.
Held-out prose and code, {EVAL_WINDOWS} windows of {LENGTH} tokens each, BOS first; the dense model measured in the
same run.

```
{format_table(table)}
```

The int4 model's transformer body (no LM head), exported (target portable: blocked DequantizeLinear + MatMul,
which ONNX Runtime runs as MatMulNBits, in float32), against eager on a 256-token prose prompt:

```
{parity_table}
```
"""


if __name__ == "__main__":
    main()
