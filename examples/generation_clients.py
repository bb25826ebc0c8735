"""Which family generates in which client: every family's text-generation export (dense, split 8/2, upcycle 8/2,
tiny random models built from small configs; targets portable and ort) against eager PyTorch, in our runner,
onnxruntime-genai and optimum.

    python3 dev.py clients        (sets up .venv-clients for optimum, whose pins clash with ours, then runs this)

Per export: generation parity (prefill + 32 cached decode steps teacher-forced on eager's greedy tokens, logits
within the parity bound), then 32 greedy tokens from each client compared with transformers' own generate.
optimum-onnx pins transformers < 4.58, so it runs in its own environment (--optimum-python), reading the same
directories; onnxruntime-genai installs beside us (extra `genai`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import moe_compile
from moe_compile.table import format_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.export.test_generation import (  # noqa: E402
    FAMILIES, PROMPTS, SPLIT, UPCYCLE, build, convert, genai_greedy, transformers_greedy)

STEPS = 32
TARGETS = ("portable", "ort")  # ort: GroupQueryAttention over shared cache buffers, com.microsoft.MoE nodes
OPTIMUM_SCRIPT = """
import json, sys, torch
from optimum.onnxruntime import ORTModelForCausalLM
jobs = json.loads(sys.argv[1])
for directory, prompt, steps in jobs:
    try:
        model = ORTModelForCausalLM.from_pretrained(directory, use_cache=True, use_io_binding=False)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        print(json.dumps(out[0, len(prompt):].tolist()))
    except Exception as error:
        print(json.dumps(f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"))
"""


def genai_tokens(directory: Path, prompt: list[int], steps: int):
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "not installed"
    if not (directory / "genai_config.json").is_file():
        return "model type unknown to genai"
    return genai_greedy(directory, prompt, steps)


def verdict(tokens, expected) -> str:
    if isinstance(tokens, str):
        return tokens
    if tokens == expected:
        return f"same {len(expected)} tokens"
    return f"differs from token {next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(tokens))}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimum-python", help="python of an environment with optimum-onnx (transformers < 4.58)")
    parser.add_argument("--json", default="docs/generation_clients.json", help="where to record the rows")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    prompt = PROMPTS[0]
    rows, jobs = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for family, target in ((family, target) for family in FAMILIES for target in TARGETS):
            for conversion, fields in (("dense", None), ("split 8/2", SPLIT), ("upcycle 8/2", UPCYCLE)):
                dense = build(family)
                model = dense if fields is None else convert(dense, **fields)
                directory = Path(scratch) / f"{family}-{conversion.split()[0]}-{target}"
                moe_compile.export(model, None, directory, task="text-generation", target=target)
                parity = moe_compile.check_generation(model, directory, PROMPTS, steps=STEPS)
                expected = transformers_greedy(model, prompt, STEPS)
                ours = moe_compile.generate(directory, [prompt], STEPS, stop_tokens=[]).tokens[0]
                rows.append({"family": family, "target": target, "conversion": conversion,
                             "parity_passed": parity.passed,
                             "max_abs": parity.max_abs, "greedy_agreement": parity.token_agreement,
                             "ours": verdict(ours, expected), "genai": verdict(genai_tokens(directory, prompt, STEPS),
                                                                                expected),
                             "expected": expected})
                jobs.append((str(directory), prompt, STEPS))
                print(f"{family} {target} {conversion}: parity {'PASS' if parity.passed else 'FAIL'}",
                      file=sys.stderr)
        if args.optimum_python:
            out = subprocess.run([args.optimum_python, "-c", OPTIMUM_SCRIPT, json.dumps(jobs)], capture_output=True,
                                 text=True, check=True).stdout.splitlines()
            for row, line in zip(rows, out):
                row["optimum"] = verdict(json.loads(line), row["expected"])
    for row in rows:
        row.setdefault("optimum", "not run (--optimum-python)")
        del row["expected"]
    table = [("family", "target", "conversion", "generation parity (max abs)", "our runner", "onnxruntime-genai",
              "optimum")]
    table += [(r["family"], r["target"], r["conversion"],
               f"{'PASS' if r['parity_passed'] else 'FAIL'} ({r['max_abs']:.2g})", r["ours"], r["genai"],
               r["optimum"]) for r in rows]
    print(format_table(table, f"32 greedy tokens vs transformers' generate (prompt of {len(prompt)} tokens)"))
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["parity_passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
