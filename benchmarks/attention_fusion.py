"""Attention fusion: a dense GPT-2-small-shaped body in ONNX Runtime, unfused export vs fused exports, beside eager.

    python benchmarks/attention_fusion.py          # writes benchmarks/results/attention_fusion.json, prints a table
    python benchmarks/attention_fusion.py --tiny   # a tiny configuration (checks that the script runs)

One process, side by side: the body of run.py's model suite (GPT2Model, 12 layers, d 768, 12 heads, random
init, no LM head, last hidden state) exported once with target="ort" (dynamic batch and sequence), and that file
passed through moe_compile.export.fusion.fuse_attention: by default (the causal masks become
GroupQueryAttention(causal=1), "fused GQA") and with causal=False (MultiHeadAttention, "fused MHA"); prompt
processing of 512 and 2048 tokens, batch 1, fp32,
ONNX Runtime with intra_op_num_threads=1 and eager PyTorch with torch.set_num_threads(1). Timed as in run.py:
round-robin blocks after two warm-up calls each, a figure is the median over blocks. The load average is recorded
before and after each token count (the machine is shared).
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
             "threads": 1, "blocks": args.blocks}
    body = gpt2_body(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / f"body-{name}.onnx" for name in ("unfused", "fused MHA", "fused GQA")}
        start = time.perf_counter()
        mc.export(body, torch.zeros(1, 8, dtype=torch.long), paths["unfused"], target="ort")
        export_s = time.perf_counter() - start
        fusions = {}
        for name, causal in (("fused MHA", False), ("fused GQA", None)):
            start = time.perf_counter()
            fused_model, fused = fuse_attention(onnx.load(str(paths["unfused"])), causal=causal)
            fusions[name] = {"fuse_s": round(time.perf_counter() - start, 2), "attention_fused": fused,
                             "ops": sorted({n.op_type for n in fused_model.graph.node if n.domain == "com.microsoft"})}
            onnx.save(fused_model, str(paths[name]))
            del fused_model
        setup.update(export_s=round(export_s, 1), fusions=fusions)
        sessions = {name: ort_session(path, 1) for name, path in paths.items()}
        runs = []
        for tokens in sizes.model_tokens:
            ids = torch.randint(0, 50257, (1, tokens), generator=torch.Generator().manual_seed(2))
            feed = {sessions["unfused"].get_inputs()[0].name: ids.numpy()}
            calls = {"eager": lambda: body(ids),
                     **{name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}}
            load_before = _load()
            with torch.inference_mode():
                expected = body(ids).numpy()
                diffs = {name: float(np.abs(s.run(None, feed)[0] - expected).max()) for name, s in sessions.items()}
                seconds = time_round_robin(calls, args.blocks, 1)
            runs.append({"tokens": tokens, "load_before": load_before, "load_after": _load(),
                         "ms": {name: round(s * 1e3, 1) for name, s in seconds.items()},
                         "speedup_over_unfused": {name: round(seconds["unfused"] / seconds[name], 3)
                                                  for name in fusions},
                         "ort_over_eager": {name: round(seconds[name] / seconds["eager"], 3)
                                            for name in sessions},
                         "max_abs_diff_to_eager": diffs})
            print(f"  {tokens} tokens done", flush=True)
    results = {"setup": setup, "runs": runs}
    counts = ", ".join(f"{name}: {f['attention_fused']} x {'/'.join(f['ops'])}" for name, f in fusions.items())
    print(f"GPT-2-small-shaped body ({sizes.layers} layers, d {sizes.d_model}, {sizes.heads} heads), batch 1, "
          f"1 thread; fused attention subgraphs: {counts}")
    names = ["eager", *sessions]
    header = f"{'tokens':>6}  " + "  ".join(f"{name + ' ms':>14}" for name in names) + "  " + \
        "  ".join(f"{name + ' / eager':>17}" for name in sessions) + f"  {'load 1/5/15 min before -> after':>34}"
    print(header)
    print("-" * len(header))
    for run in runs:
        print(f"{run['tokens']:>6}  " + "  ".join(f"{run['ms'][name]:>14.1f}" for name in names) + "  " +
              "  ".join(f"{run['ort_over_eager'][name]:>17.3f}" for name in sessions) +
              f"  {str(run['load_before']) + ' -> ' + str(run['load_after']):>34}")
    if not args.tiny or args.out != RESULTS:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_fusion.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
