"""The main job on the embedded example GPT: find its FFNs, convert them with every routing, compare with the
dense model, export each MoE model to ONNX and check it in ONNX Runtime. Then what split experts cost in quality
on a trained GPT (examples/checkpoints), data-free and calibrated.

    python3 dev.py demo          (or: .venv/bin/python examples/demo.py)
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

import moe_compile as mc
from moe_compile.evaluate import evaluate_split
from moe_compile.example_models import build_example, load_checkpoint
from moe_compile.example_text import calibration_batches, perplexity, stdlib_bytes
from moe_compile.table import format_table

TRAINED = Path(__file__).resolve().parent / "checkpoints" / "tiny_gpt_swiglu.safetensors"

# (label, MoEConfig, ONNX target): exact rows must reproduce the dense model; sparse rows trade accuracy for FLOPs.
RECIPES = [
    ("token_choice top-2/8, upcycled (exact)", mc.MoEConfig(num_experts=8, top_k=2, routing="token_choice"), "ort"),
    ("token_choice top-8/8, split (exact)", mc.MoEConfig(num_experts=8, top_k=8, experts="split"), "portable"),
    ("token_choice top-2/8, split", mc.MoEConfig(num_experts=8, top_k=2, experts="split"), "portable"),
    ("switch top-1/8, split, cf 1.25", mc.MoEConfig(num_experts=8, routing="switch", experts="split"), "portable"),
    ("expert_choice k=8/8, split (exact)", mc.MoEConfig(num_experts=8, top_k=8, routing="expert_choice",
                                                        experts="split"), "portable"),
    ("expert_choice k=2/8, split", mc.MoEConfig(num_experts=8, top_k=2, routing="expert_choice",
                                                experts="split"), "portable"),
]


def compare(dense_logits: torch.Tensor, moe_logits: torch.Tensor) -> tuple[float, float]:
    """(max |logits difference|, share of positions whose top-1 token agrees)."""
    error = (moe_logits - dense_logits).abs().max().item()
    agreement = (moe_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean().item()
    return error, agreement


def main() -> None:
    torch.manual_seed(0)
    # GPT-2's tanh GELU, which ONNX Runtime's com.microsoft.MoE computes (nanoGPT's erf GELU falls back to portable)
    dense = build_example("nanogpt", n_layer=4, n_embd=128, n_head=4, block_size=128, activation="gelu_tanh")
    tokens = torch.randint(0, dense.config.vocab_size, (4, 64))
    export_tokens, check_tokens = tokens[:2, :32], tokens[:3, :48]  # check at a shape other than the export's
    with torch.no_grad():
        dense_logits = dense(tokens)

    print("== FFN sites found in the embedded nanoGPT ==")
    print(mc.find_ffn_blocks(dense).table())

    rows = []
    out_dir = Path(tempfile.mkdtemp(prefix="moe-compile-demo-"))
    for i, (label, config, target) in enumerate(RECIPES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # expert_choice's causality warning; the README explains it
            model = mc.convert(dense, config)
        print(f"\n== {label} ==")
        print(model.moe_report.table())
        with torch.no_grad():
            error, agreement = compare(dense_logits, model(tokens))
        dropped = max(s.dropped_fraction for s in mc.routing_stats(model).values())

        path = out_dir / f"model{i}.onnx"
        exported = mc.export(model, (export_tokens,), path, target=target)
        print(exported.table())
        parity = mc.check_parity(model, path, (check_tokens,))
        print(parity.table())
        lowering = "+".join(sorted({layer.lowering for layer in exported.layers}))
        rows.append((label, f"{error:.2e}", f"{agreement:.1%}", f"{dropped:.1%}", lowering,
                     f"{parity.outputs[0].max_abs:.2e}", "pass" if parity.passed else "FAIL"))

    header = ("conversion", "max|dlogits| vs dense", "top-1 = dense", "dropped", "ONNX lowering",
              "ORT vs eager", "parity")
    print()
    print(format_table([header, *rows], "== Parity: MoE vs dense (eager), and ONNX Runtime vs eager (fp32) =="))
    print(f"\nONNX files in {out_dir}")
    if not all(r[-1] == "pass" for r in rows):
        raise SystemExit("demo: an ONNX export did not match eager PyTorch")
    trained_quality()


def trained_quality(experts: int = 32, active: float = 0.25) -> None:
    """Validation perplexity of the trained SwiGLU GPT, dense and split to `active` of its FFN three ways."""
    dense = load_checkpoint(TRAINED)
    validation, batches = stdlib_bytes("validation"), calibration_batches()
    dense_ppl = perplexity(dense, validation, max_windows=64)
    rows = [("dense", "100%", f"{dense_ppl:.3f}", "-", "-")]
    for label, fields, data in (("split, data-free", {}, None),
                                ("split, calibrated (training-free)", {"distill_steps": 0}, batches),
                                ("split, calibrated + distillation", {}, batches)):
        row = evaluate_split(dense, {"num_experts": experts, **fields}, active, validation, data, max_windows=64)
        rows.append((label, f"{row['active']:.0%}", f"{row['perplexity']:.3f}",
                      f"{row['perplexity'] / dense_ppl - 1:+.1%}", f"{row['convert_seconds']:.1f} s"))
    print()
    print(format_table([("model", "active FFN", "perplexity", "vs dense", "convert"), *rows],
                       f"== Quality on a trained GPT ({TRAINED.name}, E = {experts}, validation text) =="))


if __name__ == "__main__":
    main()
