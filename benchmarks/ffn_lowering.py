"""How fast each ONNX lowering of one MoE FFN runs in ONNX Runtime, relative to the dense FFN it replaces.

Setup (fixed, from issue 3): fp32, ONNX Runtime CPU with 1 thread, a GPT-2-small FFN (d = 768, d_ff = 3072,
gelu_tanh), E = 8 experts, top-2 token choice, 2048 tokens. Two MoEs:
  split     8 experts of width 384 (the dense neurons partitioned); FLOP ideal 2/8 = 0.25x of dense
  upcycled  8 copies of the dense FFN (width 3072);                    FLOP ideal 2/1 = 2.0x of dense
Both use weighted top-2 gates (combine="weighted") so that com.microsoft.MoE applies to the split MoE too.
Each is exported with target="ort" (one com.microsoft.MoE node), and with target="portable" (standard ops,
capacity-padded) at capacity_factor 1.25 (C = ceil(1.25 T k / E) = 640 slots per expert), at 1.0 (512 slots,
no slack: drops whenever routing is unbalanced) and dropless (C = T = 2048 slots per expert).

Timing: every model is exported first; then only ONNX Runtime runs. After a warm-up, the sessions are timed
in round-robin blocks of `--calls` calls each, `--blocks` times; a figure is the median over blocks of the
mean time per call. Writes benchmarks/results/ffn_lowering.{json,md}.

    python benchmarks/ffn_lowering.py [--blocks 7] [--calls 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_compile
from moe_compile import MoEConfig

D_MODEL, D_FF, EXPERTS, TOP_K, TOKENS = 768, 3072, 8, 2, 2048
PORTABLE_CAPACITIES = (1.25, 1.0)
RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE = ("Issue 3's reference ratios to dense (another machine of this kind): split 0.45x via com.microsoft.MoE, "
             "0.39x capacity-padded standard ops; upcycled 3.30x and 2.61x.")


class GPT2FFN(nn.Module):
    """The dense GPT-2-small FFN: c_proj(gelu_tanh(c_fc(x)))."""

    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(D_MODEL, D_FF)
        self.c_proj = nn.Linear(D_FF, D_MODEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    """A holder whose `mlp` convert() replaces."""

    def __init__(self):
        super().__init__()
        self.mlp = GPT2FFN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def variants() -> list[tuple[str, nn.Module, dict, float]]:
    """(name, model, export keyword arguments, FLOP ideal relative to dense)."""
    torch.manual_seed(0)
    dense = Block().eval()
    split = moe_compile.convert(dense, MoEConfig(num_experts=EXPERTS, top_k=TOP_K, experts="split",
                                                 split_strategy="contiguous", combine="weighted"))
    upcycled = moe_compile.convert(dense, MoEConfig(num_experts=EXPERTS, top_k=TOP_K, experts="upcycle"))
    out = [("dense FFN", dense, {"target": "portable"}, 1.0)]
    for name, model, ideal in (("split", split, TOP_K / EXPERTS), ("upcycled", upcycled, float(TOP_K))):
        out.append((f"{name} / ort (com.microsoft.MoE)", model, {"target": "ort"}, ideal))
        out += [(f"{name} / portable, cf={cf}", model, {"target": "portable", "capacity_factor": cf}, ideal)
                for cf in PORTABLE_CAPACITIES]
        out.append((f"{name} / portable, C=T dropless", model, {"target": "portable"}, ideal))
    return out


def time_sessions(sessions: list[ort.InferenceSession], feed: dict, blocks: int, calls: int) -> list[float]:
    """Median over `blocks` round-robin blocks of the mean seconds per call, one figure per session."""
    for session in sessions:
        for _ in range(2):
            session.run(None, feed)
    samples = [[] for _ in sessions]
    for _ in range(blocks):
        for session, times in zip(sessions, samples):
            start = time.perf_counter()
            for _ in range(calls):
                session.run(None, feed)
            times.append((time.perf_counter() - start) / calls)
    return [statistics.median(times) for times in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    x = torch.randn(2, TOKENS // 2, D_MODEL)  # 2048 tokens; export needs batch >= 2 to keep the axis dynamic
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    rows, sessions = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model, kwargs, ideal) in enumerate(variants()):
            path = Path(tmp) / f"v{i}.onnx"
            report = moe_compile.export(model, x, path, **kwargs)
            lowering = report.layers[0] if report.layers else None
            sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
            rows.append({"variant": name, "lowering": lowering.lowering if lowering else "dense",
                         "capacity": lowering.capacity if lowering else "-", "ideal_ratio": ideal})
        feed = {sessions[0].get_inputs()[0].name: x.numpy()}
        seconds = time_sessions(sessions, feed, args.blocks, args.calls)
    for row, s in zip(rows, seconds):
        row.update(ms_per_call=round(s * 1e3, 2), ratio_to_dense=round(s / seconds[0], 3))

    setup = {"d_model": D_MODEL, "d_ff": D_FF, "experts": EXPERTS, "top_k": TOP_K, "tokens": TOKENS,
             "dtype": "float32", "intra_op_num_threads": 1, "blocks": args.blocks, "calls_per_block": args.calls,
             "onnxruntime": ort.__version__, "torch": torch.__version__, "machine": platform.processor() or
             platform.machine()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ffn_lowering.json").write_text(json.dumps({"setup": setup, "results": rows, "reference": REFERENCE},
                                                          indent=2) + "\n")
    table = markdown(rows)
    (RESULTS / "ffn_lowering.md").write_text(f"# FFN lowering benchmark\n\nSetup: {json.dumps(setup)}\n\n{table}\n\n"
                                             f"{REFERENCE}\n")
    print(table)


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | lowering | capacity | ms/call | ratio to dense | FLOP ideal |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['lowering']} | {r['capacity']} | {r['ms_per_call']} | "
              f"{r['ratio_to_dense']:.2f}x | {r['ideal_ratio']:.2f}x |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
