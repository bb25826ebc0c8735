"""One MoE FFN layer on a CUDA GPU, given its routing: moe_compile::moe_ffn (Triton grouped GEMM) against a dense
cuBLAS GEMM pair of the same FLOPs, torch.nn.functional.grouped_mm, the eager per-expert loop and (when
onnxruntime-gpu is installed) the `ort` target's com.microsoft.MoE on ONNX Runtime's CUDA provider.

    FLOPs = 2 T k (rows(W1) d + d m)     (rows(W1) = 2m when gated); TFLOP/s = FLOPs / time
    dense = x [T, d] @ [d, k rows(W1)], then [T, k m] @ [k m, d]: the same FLOPs as two plain cuBLAS GEMMs

Routing: router logits of random N(0, 1) tokens against a random router, top-k, softmax gates (near balanced).
Writes JSON and a markdown table (TFLOP/s, ms, ratio of each method's time to dense) under --out.
Run by scripts/gpu_check.sh; bounded by --budget seconds (methods are skipped, and said so, past it).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from moe_compile.kernels import reference_moe_ffn
from moe_compile.moe.activations import ACTIVATIONS
from moe_compile.kernels.triton_moe import CONFIGS, fused_moe, pick_config
from moe_compile.table import format_table


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    width: int  # expert FFN width m
    experts: int
    top_k: int
    activation: str
    gated: bool


SHAPES = (
    Shape("gpt2-small", 768, 3072, 8, 2, "gelu_tanh", False),  # GPT-2 small FFN upcycled to 8 experts
    Shape("llama7b-like", 4096, 14336, 8, 2, "silu", True),  # d 4096, d_ff 14336, SwiGLU, E 8, k 2 (Mixtral)
    Shape("fine-grained", 2048, 1408, 64, 8, "silu", True),  # E 64, k 8 (DeepSeekMoE-like widths)
)
TOKENS = (512, 1024, 2048, 4096, 8192, 16384)


@dataclass
class Result:
    shape: str
    tokens: int
    method: str
    ms: Optional[float]
    tflops: Optional[float]
    vs_dense: Optional[float]  # this method's time / dense time (1.0 = as fast as dense; lower is faster)
    note: str = ""


def timed(fn: Callable[[], object], budget_ms: float = 150.0) -> float:
    """Mean milliseconds per call: 2 warm-up calls, then as many as fit in about budget_ms (3 to 50)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = int(min(50, max(3, budget_ms / once)))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def operands(shape: Shape, tokens: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rows = 2 * shape.width if shape.gated else shape.width
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, device="cuda", dtype=dtype) * scale  # noqa: E731
    x = r(tokens, shape.d)
    router = r(shape.experts, shape.d, scale=shape.d ** -0.5)
    gates, expert_ids = torch.softmax((x @ router.t()).float(), -1).topk(shape.top_k, dim=-1)
    weights = dict(fc1_weight=r(shape.experts, rows, shape.d, scale=shape.d ** -0.5),
                   fc1_bias=r(shape.experts, rows, scale=0.1),
                   fc2_weight=r(shape.experts, shape.d, shape.width, scale=shape.width ** -0.5),
                   fc2_bias=r(shape.experts, shape.d, scale=0.1))
    return x, expert_ids.int(), gates.to(dtype), weights


def flops(shape: Shape, tokens: int) -> float:
    rows = 2 * shape.width if shape.gated else shape.width
    return 2.0 * tokens * shape.top_k * (rows * shape.d + shape.d * shape.width)


def grouped_mm_fn():
    """torch.nn.functional.grouped_mm (torch >= 2.10), else torch._grouped_mm (2.8, 2.9), else None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_layer(x, expert_ids, gates, w, activation: str, gated: bool):
    """The layer on grouped_mm: sort rows by expert, fc1 and fc2 as grouped GEMMs over the experts' row
    segments (offs = cumulative counts), activation and gate weight in torch, per-token sum."""
    mm = grouped_mm_fn()
    tokens, k = expert_ids.shape
    flat = expert_ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    offs = torch.bincount(flat, minlength=w["fc1_weight"].shape[0]).cumsum(0).to(torch.int32)
    rows = x[order // k]
    h = mm(rows, w["fc1_weight"].transpose(1, 2), offs=offs)  # Linear layout [E, out, in] = column-major [E, in, out]
    width = w["fc2_weight"].shape[2]
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    segment = torch.repeat_interleave(torch.arange(offs.shape[0], device=x.device), counts, output_size=flat.shape[0])
    h = h + w["fc1_bias"][segment]
    act = ACTIVATIONS[activation]
    h = act(h[:, :width]) * h[:, width:] if gated else act(h)
    out = mm(h, w["fc2_weight"].transpose(1, 2), offs=offs) + w["fc2_bias"][segment]
    out = out * gates.reshape(-1)[order].unsqueeze(1)
    y = torch.zeros(tokens * k, x.shape[1], device=x.device, dtype=out.dtype).index_copy(0, order, out)
    return y.view(tokens, k, -1).sum(1)


def tuned_config(shape, x, ids, gates, w):
    """The fastest of pick_config's tiles and the large-tile CONFIGS (BLOCK_M >= 64) for this problem."""
    timings = {}
    for config in dict.fromkeys((pick_config(ids.numel(), shape.experts), *(c for c in CONFIGS if c.block_m >= 64))):
        try:
            timings[config] = timed(lambda: fused_moe(x, ids, gates, **w, activation=shape.activation,
                                                      gated=shape.gated, config=config), 60.0)
        except Exception as error:  # a tile that does not fit (shared memory) is skipped
            print(f"  tiles {config}: {type(error).__name__}: {str(error)[:120]}")
    return min(timings, key=timings.get), timings


def bench_shape(shape: Shape, tokens: int, dtype: torch.dtype, deadline: float, tune: bool) -> list[Result]:
    x, ids, gates, w = operands(shape, tokens, dtype)
    total = flops(shape, tokens)
    rows = 2 * shape.width if shape.gated else shape.width
    dense_w1 = torch.randn(shape.d, shape.top_k * rows, device="cuda", dtype=dtype)
    dense_w2 = torch.randn(shape.top_k * shape.width, shape.d, device="cuda", dtype=dtype)
    methods: dict[str, Callable[[], object]] = {
        "dense cuBLAS": lambda: (x @ dense_w1)[:, :shape.top_k * shape.width] @ dense_w2,
        "moe_ffn (Triton)": lambda: torch.ops.moe_compile.moe_ffn(x, ids, gates, *w.values(), shape.activation,
                                                                  shape.gated),
        "grouped_mm": lambda: grouped_mm_layer(x, ids, gates, w, shape.activation, shape.gated),
        "eager loop": lambda: reference_moe_ffn(x, ids, gates, *w.values(), shape.activation, shape.gated),
    }
    results, dense_ms = [], None
    for method, fn in methods.items():
        note = ""
        if method == "grouped_mm" and grouped_mm_fn() is None:
            ms, note = None, "no grouped_mm in this torch"
        elif time.monotonic() > deadline:
            ms, note = None, "skipped: time budget spent"
        else:
            try:
                ms = timed(fn)
            except Exception as error:
                ms, note = None, f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
        if method == "dense cuBLAS":
            dense_ms = ms
        results.append(Result(shape.name, tokens, method, ms, total / ms / 1e9 if ms else None,
                              ms / dense_ms if ms and dense_ms else None, note))
    if tune and tokens >= 4096 and time.monotonic() < deadline:  # the goal's regime; each tile compiles once
        best, timings = tuned_config(shape, x, ids, gates, w)
        ms = timings[best]
        results.append(Result(shape.name, tokens, "moe_ffn (best tiles)", ms, total / ms / 1e9,
                              ms / dense_ms if dense_ms else None,
                              f"BM{best.block_m} BN{best.block_n} BK{best.block_k} "
                              f"w{best.num_warps} s{best.num_stages}"))
    return results


def bench_ort(shape: Shape, tokens: int, tmp: Path) -> Optional[Result]:
    """The `ort` target (com.microsoft.MoE, fp16) on ONNX Runtime's CUDA provider, with IO bound on the GPU."""
    import numpy as np
    import onnxruntime as ort

    from moe_compile.export import export
    from moe_compile.moe import MoELayer
    from moe_compile.moe.experts import ExpertWeights
    from moe_compile.moe.routers import TokenChoiceRouter

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * s[-1] ** -0.5  # noqa: E731
    experts = ExpertWeights(up_weight=r(shape.experts, shape.width, shape.d), up_bias=None,
                            down_weight=r(shape.experts, shape.d, shape.width), down_bias=None,
                            gate_weight=r(shape.experts, shape.width, shape.d) if shape.gated else None)
    router = TokenChoiceRouter(shape.d, shape.experts, shape.top_k, None, normalize=False)
    router.weight.data = r(shape.experts, shape.d)  # a decisive, near balanced router (zeros would tie)
    layer = MoELayer(experts, router, shape.activation).eval()
    path = tmp / f"{shape.name}.onnx"
    if not path.exists():
        export(layer, (torch.randn(2, 8, shape.d),), path, target="ort", dtype=torch.float16, fallback=False)
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    x = torch.randn(1, tokens, shape.d, device="cuda", dtype=torch.float16)
    y = torch.empty_like(x)
    binding = session.io_binding()
    binding.bind_input(session.get_inputs()[0].name, "cuda", 0, np.float16, tuple(x.shape), x.data_ptr())
    binding.bind_output(session.get_outputs()[0].name, "cuda", 0, np.float16, tuple(y.shape), y.data_ptr())
    ms = timed(lambda: session.run_with_iobinding(binding))
    total = flops(shape, tokens)
    return Result(shape.name, tokens, "ort CUDA com.microsoft.MoE (fp16)", ms, total / ms / 1e9, None,
                  "includes its router; time ratio to bf16 dense not comparable")


def markdown(results: list[Result], header: str) -> str:
    rows = [("shape", "tokens", "method", "ms", "TFLOP/s", "time / dense", "note")]
    rows += [(r.shape, str(r.tokens), r.method, f"{r.ms:.3f}" if r.ms else "-", f"{r.tflops:.1f}" if r.tflops else "-",
              f"{r.vs_dense:.2f}" if r.vs_dense else "-", r.note) for r in results]
    lines = [header, "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/moe_kernel", help="path stem of the .json and .md")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--shapes", nargs="+", default=[s.name for s in SHAPES])
    parser.add_argument("--budget", type=float, default=240.0, help="seconds; later methods are skipped past it")
    parser.add_argument("--no-tune", action="store_true", help="time only pick_config's tiles")
    parser.add_argument("--ort-tokens", type=int, nargs="*", default=[2048, 8192])
    parser.add_argument("--ort-shapes", nargs="*", default=["gpt2-small", "fine-grained"],
                        help="shapes for the ort target (exporting LLaMA-size experts takes minutes of CPU)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/moe_kernel.py needs a CUDA GPU.")
    deadline = time.monotonic() + args.budget
    shapes = [s for s in SHAPES if s.name in args.shapes]
    results: list[Result] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
            "dtype": "bfloat16"}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass

    def write():
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]},
                                                       indent=1))
        header = f"MoE layer benchmark, bf16 ({', '.join(f'{k} {v}' for k, v in meta.items())})"
        out.with_suffix(".md").write_text(markdown(results, header))

    for shape in shapes:
        for tokens in args.tokens:
            new = bench_shape(shape, tokens, torch.bfloat16, deadline, tune=not args.no_tune)
            results += new
            print(format_table([("shape", "tokens", "method", "ms", "TFLOP/s", "time/dense", "note")] +
                               [(r.shape, str(r.tokens), r.method, f"{r.ms:.3f}" if r.ms else "-",
                                 f"{r.tflops:.1f}" if r.tflops else "-", f"{r.vs_dense:.2f}" if r.vs_dense else "-",
                                 r.note) for r in new]), flush=True)
            write()
            torch.cuda.empty_cache()
    try:
        import onnxruntime  # noqa: F401
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for shape in (s for s in shapes if s.name in args.ort_shapes):
                for tokens in args.ort_tokens:
                    if time.monotonic() > deadline:
                        break
                    result = bench_ort(shape, tokens, Path(tmp))
                    if result is None:
                        print("ONNX Runtime has no CUDA provider here (install the `gpu` extra): ort skipped")
                        break
                    results.append(result)
                    print(result, flush=True)
                    write()
    except Exception as error:  # the kernel results are already written
        print(f"ort benchmark skipped: {type(error).__name__}: {error}")
    write()
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
