"""Healing a real pretrained LLM: Gemma 3 270M split into experts, then trained end to end to the dense model.

    python examples/gemma3_healing.py --tokens 100000               # needs the `gguf` extra (and `plot` for the PNG)
    python examples/gemma3_healing.py --report-only                 # rewrite the docs from docs/gemma3_healing.json

Per active FFN fraction F (k = F * 8 of 8 split experts, calibrated with the defaults on 4,096 tokens of prose):
perplexity of the converted model on held-out English prose (standard-library docstrings, 8 windows of 256 tokens,
BOS first) and on held-out code (standard-library source), then `moe_compile.heal` (its default loss: KL of the
logits at 64 sampled positions per window plus every block's output) on --tokens tokens of the training prose and an
equal share of training code, with the held-out
prose perplexity measured along the way. The baseline at F = 50%: the dense FFNs pruned in width to the same active
neurons (two neuron groups, the calibrated most-used one always on, the other never: E = 2, k = 1, one shared),
healed with the same budget. Every figure is measured in this one run, dense included. Writes
docs/gemma3_healing.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

import moe_compile as mc
from moe_compile.example_text import calibration_batches, perplexity, stdlib_prose, stdlib_text, token_ids
from moe_compile.heal import heal
from moe_compile.table import format_table

from gemma3 import fetch, load  # examples/gemma3.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
RESULT, DOC, PLOT = (ROOT / "docs" / f"gemma3_healing.{ext}" for ext in ("json", "md", "png"))
LENGTH, EVAL_WINDOWS, CALIBRATION_WINDOWS = 256, 8, 16


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model, texts: dict, bos: int) -> dict:
    return {name: perplexity(model, ids, length=LENGTH, max_windows=EVAL_WINDOWS, bos=bos)
            for name, ids in texts.items()}


def run(args: argparse.Namespace) -> dict:
    dense, tokenizer = load(fetch())
    bos = tokenizer.bos_token_id
    prose = token_ids(stdlib_prose("train"), tokenizer)
    train = torch.cat([prose, token_ids(stdlib_text("train"), tokenizer)[:len(prose)]])
    held_out = {"prose": token_ids(stdlib_prose("validation"), tokenizer),
                "code": token_ids(stdlib_text("validation"), tokenizer)}
    calibration = calibration_batches(LENGTH, CALIBRATION_WINDOWS, batch_size=4, data=prose, bos=bos)
    result = {"tokens": args.tokens, "lr": args.lr, "length": LENGTH, "eval_windows": EVAL_WINDOWS,
              "training_tokens_available": len(train), "dense": measure(dense, held_out, bos), "rows": [],
              "machine": {"threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    print(f"dense: {result['dense']}", flush=True)
    plans = [(f"split 8/{round(8 * f)}", f, dict(num_experts=8, top_k=round(8 * f))) for f in args.fractions]
    if not args.skip_baseline:
        plans.append(("pruned to 50%", 0.5, dict(num_experts=2, top_k=1, shared_experts=1)))
    for name, fraction, fields in plans:
        start = time.perf_counter()
        moe = mc.convert(dense, mc.MoEConfig(experts="split", **fields), calibration_data=calibration, progress=False)
        row = {"model": name, "active": mc.model_stats(moe).active_fraction, "config": fields,
               "convert_s": time.perf_counter() - start, "before": measure(moe, held_out, bos)}
        print(f"{name}: before healing {row['before']} ({row['convert_s']:.0f} s)", flush=True)
        report = heal(moe, dense, train, tokens=args.tokens, length=LENGTH, batch_size=4, lr=args.lr, bos=bos,
                      eval_data=held_out["prose"], eval_every=max(args.tokens // 8, 1), eval_windows=EVAL_WINDOWS)
        row.update(after=measure(moe, held_out, bos), heal_s=report.seconds, heal_tokens=report.tokens,
                   curve=report.curve, losses=report.losses[::10], peak_memory_mb=peak_mb())
        print(f"{name}: after healing {row['after']} ({row['heal_s']:.0f} s)", flush=True)
        result["rows"].append(row)
        RESULT.write_text(json.dumps(result, indent=1) + "\n")
    return result


def report(result: dict) -> None:
    dense = result["dense"]
    lines = [("model", "active FFN", "convert", "healing", "prose ppl", "vs dense", "code ppl", "vs dense"),
             ("dense", "100%", "-", "-", f"{dense['prose']:.2f}", "1.00x", f"{dense['code']:.2f}", "1.00x")]
    for row in result["rows"]:
        for stage in ("before", "after"):
            ppl = row[stage]
            healing = "-" if stage == "before" else f"{row['heal_tokens']:,} tokens, {row['heal_s'] / 60:.0f} min"
            lines.append((f"{row['model']} ({'calibrated' if stage == 'before' else 'healed'})",
                          f"{row['active']:.0%}", f"{row['convert_s']:.0f} s", healing,
                          f"{ppl['prose']:.2f}", f"{ppl['prose'] / dense['prose']:.2f}x",
                          f"{ppl['code']:.2f}", f"{ppl['code'] / dense['code']:.2f}x"))
    table = format_table(lines)
    curve = [("tokens", *(row["model"] for row in result["rows"]))]
    for i, (tokens, _) in enumerate(result["rows"][0]["curve"]):
        curve.append((f"{tokens:,}", *(f"{row['curve'][i][1] / dense['prose']:.3f}x" if i < len(row["curve"])
                                       else "-" for row in result["rows"])))
    print(table, "\n\n" + format_table(curve))
    DOC.write_text(f"""# Healing Gemma 3 270M

`python examples/gemma3_healing.py --tokens {result['tokens']} --lr {result['lr']}` on this 2-core machine
({result['machine']['threads']} threads, torch {result['machine']['torch']}). Perplexity on {result['eval_windows']}
held-out windows of {result['length']} tokens (BOS first) of English prose (standard-library docstrings) and of code
(standard-library source); calibration on 4,096 tokens of training prose; healing (`moe_compile.heal`, loss
"logits+hidden", the MoE layers trained, AdamW lr {result['lr']}) on windows of the training prose and code
({result['training_tokens_available']:,} tokens). The pruned baseline runs the same neurons per token as split
8/4: the calibrated most-used half of each FFN, always.

```
{table}
```

Held-out prose perplexity against dense while healing:

```
{format_table(curve)}
```

![perplexity while healing](gemma3_healing.png)
""")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (extra `plot`): no PNG", file=sys.stderr)
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in result["rows"]:
        axis.plot([t for t, _ in row["curve"]], [p / dense["prose"] for _, p in row["curve"]], marker="o",
                  label=f"{row['model']} ({row['active']:.0%} active)")
    axis.axhline(1.0, color="gray", linestyle=":", label="dense")
    axis.set_xlabel("healing tokens")
    axis.set_ylabel("held-out prose perplexity / dense")
    axis.set_title("Gemma 3 270M: healing split experts")
    axis.legend()
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="healing tokens per model (100000)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.25], help="active FFN fractions")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the pruned baseline")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs from the saved JSON")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    report(json.loads(RESULT.read_text()) if args.report_only else run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
