"""Attention fusion: GPT-2-small-shaped bodies in ONNX Runtime, unfused export vs fused exports, beside eager.

    python benchmarks/attention_fusion.py          # writes benchmarks/results/attention_fusion.json, prints a table
    python benchmarks/attention_fusion.py --tiny   # a tiny configuration (checks that the script runs)

One process, side by side: the body of run.py's model suite (GPT2Model, 12 layers, d 768, 12 heads, random
init, no LM head, last hidden state), dense and converted to split 8/2 token choice, each exported once with
target="portable" (dynamic batch and sequence: standard ops, attention op by op, our sorted MoE dispatch), and
that file passed through moe_compile.export.fusion.fuse_attention: by default (the causal masks become
GroupQueryAttention(causal=1), "fused GQA") and with causal=False (MultiHeadAttention, "fused MHA"); prompt
processing of 512 and 2048 tokens, batch 1, fp32,
ONNX Runtime with intra_op_num_threads=1 and eager PyTorch with torch.set_num_threads(1). Timed as in run.py:
round-robin blocks after two warm-up calls each, a figure is the median over blocks. The load average is recorded
before and after each token count (the machine is shared), and the CPU: ONNX Runtime's MLAS and torch's BLAS rank
differently on Intel and AMD CPUs, so a ratio to eager holds for the CPU it was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's moe_compile, not an installed one
from run import FULL, RESULTS, TINY, _quiet, gpt2_body, machine  # noqa: E402

from moe_compile.timing import ort_session, time_round_robin  # noqa: E402


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes")
    parser.add_argument("--blocks", type=int, default=3, help="timed round-robin blocks per token count")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    _quiet()
    import numpy as np
    import onnx
    import torch

    import moe_compile as mc
    from moe_compile.export.fusion import fuse_attention

    torch.set_num_threads(1)
    sizes = TINY if args.tiny else FULL
    setup = {**machine(), "sizes": {"layers": sizes.layers, "d_model": sizes.d_model, "heads": sizes.heads,
                                    "d_ff": sizes.d_ff, "tokens": list(sizes.model_tokens)},
             "threads": 1, "blocks": args.blocks, "bodies": {}}
    bodies = {kind: gpt2_body(sizes, kind) for kind in ("dense", "split")}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for kind, body in bodies.items():
            unfused = Path(tmp) / f"{kind}-unfused.onnx"
            start = time.perf_counter()
            mc.export(body, torch.zeros(1, 8, dtype=torch.long), unfused, target="portable")
            fusions = {}
            sessions[kind] = {"unfused": ort_session(unfused, 1)}
            for name, causal in (("fused MHA", False), ("fused GQA", None)):
                fused_model, fused = fuse_attention(onnx.load(str(unfused)), causal=causal)
                if fused != sizes.layers:
                    raise SystemExit(f"{kind} body, {name}: {fused} of {sizes.layers} attentions fused")
                fusions[name] = sorted({n.op_type for n in fused_model.graph.node if n.domain == "com.microsoft"})
                onnx.save(fused_model, str(Path(tmp) / f"{kind}-{name}.onnx"))
                del fused_model
                sessions[kind][name] = ort_session(Path(tmp) / f"{kind}-{name}.onnx", 1)
            setup["bodies"][kind] = {"export_and_fuse_s": round(time.perf_counter() - start, 1), "fused_ops": fusions}
        for tokens in sizes.model_tokens:
            ids = torch.randint(0, 50257, (1, tokens), generator=torch.Generator().manual_seed(2))
            feed = {sessions["dense"]["unfused"].get_inputs()[0].name: ids.numpy()}
            calls, diffs = {}, {}
            for kind, body in bodies.items():
                calls[f"{kind} eager"] = lambda body=body: body(ids)
                with torch.inference_mode():
                    expected = body(ids).numpy()
                for name, session in sessions[kind].items():
                    calls[f"{kind} {name}"] = lambda s=session: s.run(None, feed)
                    diffs[f"{kind} {name}"] = float(np.abs(session.run(None, feed)[0] - expected).max())
            load_before = _load()
            with torch.inference_mode():
                seconds = time_round_robin(calls, args.blocks, 1)
            runs.append({"tokens": tokens, "load_before": load_before, "load_after": _load(),
                         "ms": {name: round(s * 1e3, 1) for name, s in seconds.items()},
                         "ort_over_eager": {f"{kind} {name}": round(seconds[f"{kind} {name}"]
                                                                    / seconds[f"{kind} eager"], 3)
                                            for kind in bodies for name in sessions[kind]},
                         "split_over_dense": {name: round(seconds[f"split {name}"] / seconds[f"dense {name}"], 3)
                                              for name in ("eager", *sessions["dense"])},
                         "max_abs_diff_to_eager": diffs})
            print(f"  {tokens} tokens done", flush=True)
    results = {"setup": setup, "runs": runs}
    variants = ["eager", *sessions["dense"]]
    print(f"GPT-2-small-shaped body ({sizes.layers} layers, d {sizes.d_model}, {sizes.heads} heads), dense and split "
          f"8/2, batch 1, 1 thread, {setup['cpu']}")
    header = f"{'tokens':>6}  {'variant':<10}  {'dense ms':>9}  {'/ eager':>8}  {'split ms':>9}  {'/ eager':>8}  " \
             f"{'split / dense':>13}  {'load 1/5/15 min before -> after':>34}"
    print(header)
    print("-" * len(header))
    for run in runs:
        for name in variants:
            ms = [run["ms"][f"{kind} {name}"] for kind in bodies]
            over_eager = [run["ort_over_eager"].get(f"{kind} {name}") for kind in bodies]
            print(f"{run['tokens']:>6}  {name:<10}  " + "  ".join(
                f"{m:>9.1f}  {'' if r is None else f'{r:.3f}':>8}" for m, r in zip(ms, over_eager)) +
                f"  {run['split_over_dense'][name]:>13.3f}  "
                f"{str(run['load_before']) + ' -> ' + str(run['load_after']):>34}")
    if not args.tiny or args.out != RESULTS:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_fusion.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
