"""Granularity: split experts of one GPT-2-small FFN at the same 25% active, E in {8, 16, 32, 64}, in ONNX Runtime,
and where each layer's time goes.

    python benchmarks/granularity.py          # writes benchmarks/results/granularity.{json,md}, prints the table
    python benchmarks/granularity.py --tiny   # a tiny configuration (checks that the script runs)

One process, side by side: run.py's layer (d 768, d_ff 3072, gelu_tanh, seeded init) dense and split E/k with
k = E/4 (expert width 3072/E; the FLOP ideal is 0.25x dense for every E), token choice, the default (portable)
export, ONNX Runtime with 1 intra-op thread, 512 and 2048 tokens; timed as in run.py (round-robin blocks after two
warm-up calls each, the median block). Then one profiled session per layer at the largest token count splits its
kernel time by op type into

    expert GEMMs   Gemm, MatMul and the activation (the router's [T, E] Gemm included: under 2%)
    data movement  Gather, Concat, Add: rows gathered per expert, outputs concatenated, k gathers + adds per token
    routing        everything else: softmax, the tie-exact top-k, the sort by expert, the counts

beside `one pass`: the time to copy the dispatched rows once, k T d floats (numpy, same process), the unit in
which data movement is paid.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # this checkout's moe_compile, not an installed one
from run import FULL, RESULTS, TINY, _quiet, dense_ffn, machine  # noqa: E402

from moe_compile.timing import ort_session, time_round_robin  # noqa: E402

COMPUTE = {"Gemm", "MatMul", "Gelu", "FastGelu", "Tanh"}
MOVEMENT = {"Gather", "Concat", "Add"}


def phases(path: Path, x, threads: int, warm_up: int = 2, runs: int = 5) -> dict[str, float]:
    """Milliseconds per call by phase (see the module docstring) from ONNX Runtime's profiler, over the runs
    after the warm-up ones (a session's first runs also pay for growing its memory arena)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x}
    for _ in range(warm_up + runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    timed = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "model_run")[warm_up:]
    totals = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and \
                any(start <= event["ts"] <= end for start, end in timed):
            op = event["args"]["op_name"]
            phase = "expert GEMMs" if op in COMPUTE else "data movement" if op in MOVEMENT else "routing"
            totals[phase] += event["dur"]
    return {phase: round(totals[phase] / runs / 1e3, 3) for phase in ("expert GEMMs", "data movement", "routing")}


def one_pass_ms(floats: int, repeats: int = 5) -> float:
    """Milliseconds to copy `floats` fp32 values once (after a first copy has touched both buffers)."""
    import numpy as np

    source, target = np.ones(floats, np.float32), np.empty(floats, np.float32)
    np.copyto(target, source)
    start = time.perf_counter()
    for _ in range(repeats):
        np.copyto(target, source)
    return round((time.perf_counter() - start) / repeats * 1e3, 3)


def markdown(results: dict) -> str:
    tokens = results["tokens"]
    lines = ["| layer | expert width | " + " | ".join(f"T={t}" for t in tokens) +
             f" | at T={tokens[-1]}: expert GEMMs | data movement | routing | one pass (k T d floats) |",
             "|---|---|" + "---|" * len(tokens) + "---|---|---|---|"]
    for row in results["rows"]:
        cells = [f"{row['ratio'][str(t)]:.2f}x ({row['ms'][str(t)]:.1f} ms)" for t in tokens]
        split = row.get("phases_ms")
        tail = (f"{split['expert GEMMs']:.1f} ms | {split['data movement']:.1f} ms | {split['routing']:.1f} ms | "
                f"{row['one_pass_ms']:.1f} ms") if split else "- | - | - | -"
        lines.append(f"| {row['layer']} | {row['width']} | " + " | ".join(cells) + f" | {tail} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    _quiet()
    import torch

    import moe_compile as mc

    sizes = TINY if args.tiny else FULL
    tokens = (32,) if args.tiny else (512, 2048)
    experts = (8, 16) if args.tiny else (8, 16, 32, 64)
    threads, setup = 1, machine()
    torch.set_num_threads(threads)
    dense = dense_ffn(sizes)
    layers = {"dense FFN": (dense, None, sizes.d_ff)}
    for e in experts:
        config = mc.MoEConfig(num_experts=e, top_k=e // 4, experts="split", split_strategy="contiguous")
        layers[f"split {e}/{e // 4}"] = (mc.convert(dense, config).eval(), e // 4, sizes.d_ff // e)
    rows = [{"layer": name, "width": width, "k": k, "ms": {}, "ratio": {}} for name, (_, k, width) in layers.items()]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, (module, _, _) in layers.items():
            paths[name] = Path(tmp) / f"{name.replace(' ', '_').replace('/', '_')}.onnx"
            mc.export(module, torch.randn(2, 16, sizes.d_model), paths[name], target="portable")
        for t in tokens:
            x = torch.randn(1, t, sizes.d_model, generator=torch.Generator().manual_seed(1)).numpy()
            sessions = {name: ort_session(path, threads) for name, path in paths.items()}
            calls = {name: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x})) for name, s in sessions.items()}
            seconds = time_round_robin(calls, sizes.blocks, sizes.calls)
            for row in rows:
                row["ms"][str(t)] = round(seconds[row["layer"]] * 1e3, 3)
                row["ratio"][str(t)] = round(seconds[row["layer"]] / seconds["dense FFN"], 3)
            print(f"T={t}: " + ", ".join(f"{r['layer']} {r['ratio'][str(t)]:.2f}x" for r in rows), flush=True)
        for row in rows[1:]:
            row["phases_ms"] = phases(paths[row["layer"]], x, threads)
            row["one_pass_ms"] = one_pass_ms(row["k"] * tokens[-1] * sizes.d_model)
    results = {"setup": {**setup, "threads": threads, "d_model": sizes.d_model, "d_ff": sizes.d_ff,
                         "load_average_at_end": machine()["load_average_at_start"]},
               "tokens": list(tokens), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "granularity.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (args.out / "granularity.md").write_text(f"# Granularity benchmark\n\n{json.dumps(results['setup'])}\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
