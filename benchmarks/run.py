"""The benchmark suite: MoE layers and converted models against the dense ones they came from, side by side.

    python benchmarks/run.py                    # everything, writes benchmarks/results/{layer,model}.{json,md,png}
    python benchmarks/run.py --suite layer      # one suite
    python benchmarks/run.py --tiny --out DIR   # a tiny configuration (CI checks that the suite runs)

Suites (fp32, CPU; every configuration in a process of its own; within a process all variants are timed in
round-robin blocks after a warm-up, and a figure is the median over blocks of the mean time per call, so that
the ratios compare runs made side by side on a shared, noisy machine):

  layer   one GPT-2-small FFN (d 768, d_ff 3072, gelu_tanh) at T in {64, 512, 2048} tokens, 1 and 2 threads.
          Ours: split 8/2 and upcycled 8/2 token choice, split 8/2 expert choice and fine-grained split 64/16
          (width 48, the same 25% of the FFN active as split 8/2), each as the eager MoELayer and through the
          default export target. Peers: ONNX Runtime's com.microsoft.MoE (the `ort` target's node: split, upcycled),
          the naive every-expert-then-mask graph in ONNX Runtime, the Hugging Face eager loop over experts and
          torch.nn.functional.grouped_mm. Ratios: ONNX Runtime figures to the dense FFN in ONNX Runtime, eager
          figures to the dense FFN in eager PyTorch. Also the routing cost alone (router, top-k, sort, gathers,
          combine, with identity experts) as a share of the split layer.
  model   a GPT-2-small-shaped body (12 layers, d 768, random init, no LM head) dense vs split 8/2 vs upcycled
          8/2, prompt processing of 512 and 2048 tokens in ONNX Runtime (default target) and eager PyTorch, 1
          thread, beside the Amdahl bound 1 - s + s * 0.25 from the FFNs' share s of the dense time; and the time
          and peak resident memory to convert and to export each model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Sizes:
    d_model: int
    d_ff: int
    tokens: tuple[int, ...]
    threads: tuple[int, ...]
    model_tokens: tuple[int, ...]
    layers: int
    heads: int
    blocks: int
    calls: int


FULL = Sizes(768, 3072, (64, 512, 2048), (1, 2), (512, 2048), 12, 12, blocks=5, calls=3)
TINY = Sizes(64, 256, (64,), (1,), (32,), 2, 2, blocks=2, calls=1)


# ------------------------------------------------------------------------------------------------ models

def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def dense_ffn(sizes: Sizes):
    """One GPT-2-small FFN, y = W_2 gelu_tanh(W_1 x + b_1) + b_2 (seeded init), as a model's `mlp` attribute."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(sizes.d_model, sizes.d_ff), nn.Linear(sizes.d_ff, sizes.d_model)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = FFN()

        def forward(self, x):
            return self.mlp(x)

    torch.manual_seed(0)
    return Holder().eval()


def layer_variants(sizes: Sizes) -> dict[str, tuple]:
    """name -> (module, kind, ideal ratio); kind 'onnx' (exported with the default target, run in ONNX Runtime),
    'ort-op' (target ort, com.microsoft.MoE), 'eager', or 'both' (timed eager and in ONNX Runtime)."""
    import torch.nn as nn

    import moe_compile as mc
    from peers import EveryExpert, GroupedMM, HFLoop
    from moe_compile.moe.dispatch import run_experts

    class RoutingOnly(nn.Module):
        """The split layer's routing, dispatch and combine with identity experts."""

        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            y, _ = run_experts(flat, self.layer.router(x).dispatch, lambda e, rows: rows, weighted=False)
            return y.view(x.shape)

    dense = dense_ffn(sizes)

    def moe(**fields):
        config = mc.MoEConfig(**{"num_experts": 8, "top_k": 2, "split_strategy": "contiguous", **fields})
        return mc.convert(dense, config).eval()

    split, upcycle = moe(experts="split"), moe(experts="upcycle")
    split_ec = moe(experts="split", routing="expert_choice")
    fine = moe(experts="split", num_experts=64, top_k=16)
    return {
        "dense FFN": (dense, "both", 1.0),
        "split 8/2": (split, "both", 0.25),
        "split 8/2 expert choice": (split_ec, "both", 0.25),
        "split 64/16": (fine, "both", 0.25),
        "upcycle 8/2": (upcycle, "both", 2.0),
        "split 8/2 com.microsoft.MoE": (split, "ort-op", 0.25),
        "upcycle 8/2 com.microsoft.MoE": (upcycle, "ort-op", 2.0),
        "split 8/2 every-expert graph": (EveryExpert(split.mlp), "onnx", 0.25),
        "upcycle 8/2 every-expert graph": (EveryExpert(upcycle.mlp), "onnx", 2.0),
        "split 8/2 HF loop": (HFLoop(split.mlp), "eager", 0.25),
        "upcycle 8/2 HF loop": (HFLoop(upcycle.mlp), "eager", 2.0),
        "split 64/16 HF loop": (HFLoop(fine.mlp), "eager", 0.25),
        "split 8/2 grouped_mm": (GroupedMM(split.mlp), "eager", 0.25),
        "upcycle 8/2 grouped_mm": (GroupedMM(upcycle.mlp), "eager", 2.0),
        "split 8/2 routing only": (RoutingOnly(split.mlp), "onnx", 0.0),
    }


def gpt2_body(sizes: Sizes, kind: str = "dense"):
    """A GPT-2-small-shaped body (no LM head) returning its last hidden state: dense, or converted to split or
    upcycled 8/2 token choice."""
    import torch
    import torch.nn as nn
    from transformers import GPT2Config, GPT2Model

    class Body(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).last_hidden_state

    torch.manual_seed(0)
    config = GPT2Config(n_layer=sizes.layers, n_embd=sizes.d_model, n_head=sizes.heads, n_inner=sizes.d_ff,
                        n_positions=max(sizes.model_tokens), vocab_size=50257)
    body = Body(GPT2Model(config).eval())
    return body if kind == "dense" else convert_body(body, kind)


def convert_body(body, kind: str):
    """The body with its FFNs converted in place to `kind` ("split" or "upcycle") experts, 8/2 token choice."""
    import moe_compile as mc

    config = mc.MoEConfig(num_experts=8, top_k=2, experts=kind, split_strategy="contiguous")
    body.model = mc.convert(body.model, config, inplace=True)
    return body


# ------------------------------------------------------------------------------------------------ timing

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ children

def child_export_layers(sizes: Sizes, workdir: Path) -> dict:
    import torch

    import moe_compile as mc

    example = torch.randn(2, 16, sizes.d_model)
    exported = {}
    for i, (name, (module, kind, _)) in enumerate(layer_variants(sizes).items()):
        if kind == "eager":
            continue
        path = workdir / f"layer{i}.onnx"
        mc.export(module, example, path, target="ort" if kind == "ort-op" else "portable")
        exported[name] = str(path)
    return exported


def child_time_layers(sizes: Sizes, workdir: Path, tokens: int, threads: int) -> dict:
    import torch

    from moe_compile.timing import ort_session, time_round_robin

    torch.set_num_threads(threads)
    files = json.loads((workdir / "layers.json").read_text())
    x = torch.randn(1, tokens, sizes.d_model, generator=torch.Generator().manual_seed(1))
    calls, meta = {}, {}
    for name, (module, kind, ideal) in layer_variants(sizes).items():
        if kind in ("both", "eager"):
            calls[f"{name} | eager"] = (lambda m=module: m(x))
            meta[f"{name} | eager"] = (name, "eager", ideal)
        if kind in ("both", "onnx", "ort-op"):
            session = ort_session(Path(files[name]), threads)
            calls[f"{name} | onnx"] = (lambda s=session, n=session.get_inputs()[0].name: s.run(None, {n: x.numpy()}))
            meta[f"{name} | onnx"] = (name, "onnxruntime", ideal)
    with torch.inference_mode():
        seconds = time_round_robin(calls, sizes.blocks, sizes.calls)
    dense = {"eager": seconds["dense FFN | eager"], "onnxruntime": seconds["dense FFN | onnx"]}
    return {"tokens": tokens, "threads": threads, "rows": [
        {"variant": variant, "runtime": runtime, "ms": round(seconds[key] * 1e3, 3),
         "ratio_to_dense": round(seconds[key] / dense[runtime], 3), "flop_ideal": ideal}
        for key, (variant, runtime, ideal) in meta.items()]}


def child_build_model(sizes: Sizes, workdir: Path, kind: str) -> dict:
    """Build the dense body, convert it, export it with the default target: time and peak memory of each step."""
    import torch

    import moe_compile as mc

    model = gpt2_body(sizes)
    start = time.perf_counter()
    if kind != "dense":
        convert_body(model, kind)
    convert_s, convert_mb = time.perf_counter() - start, _peak_rss_mb()
    start = time.perf_counter()
    mc.export(model, torch.randint(0, 50257, (2, 16)), workdir / f"body-{kind}.onnx")
    return {"model": kind, "convert_s": round(convert_s, 2), "export_s": round(time.perf_counter() - start, 2),
            "peak_rss_mb_after_convert": round(convert_mb), "peak_rss_mb_after_export": round(_peak_rss_mb())}


def child_time_model(sizes: Sizes, workdir: Path, tokens: int) -> dict:
    import torch

    from moe_compile.timing import ort_session, time_round_robin

    torch.set_num_threads(1)
    ids = torch.randint(0, 50257, (1, tokens), generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, tokens, sizes.d_model, generator=torch.Generator().manual_seed(3))
    files = json.loads((workdir / "layers.json").read_text())
    calls = {}
    for kind in ("dense", "split", "upcycle"):
        model = gpt2_body(sizes, kind)
        session = ort_session(workdir / f"body-{kind}.onnx", 1)
        calls[f"{kind} | eager"] = (lambda m=model: m(ids))
        calls[f"{kind} | onnx"] = (lambda s=session, n=session.get_inputs()[0].name: s.run(None, {n: ids.numpy()}))
    ffn = ort_session(Path(files["dense FFN"]), 1)
    ffn_input = ffn.get_inputs()[0].name
    calls["dense FFN layer | onnx"] = lambda: ffn.run(None, {ffn_input: x.numpy()})
    with torch.inference_mode():
        seconds = time_round_robin(calls, max(2, sizes.blocks - 2), 1)
    share = sizes.layers * seconds["dense FFN layer | onnx"] / seconds["dense | onnx"]
    rows = []
    for runtime in ("onnx", "eager"):
        for kind in ("dense", "split", "upcycle"):
            rows.append({"model": kind, "runtime": "onnxruntime" if runtime == "onnx" else "eager",
                         "ms": round(seconds[f"{kind} | {runtime}"] * 1e3, 1),
                         "ratio_to_dense": round(seconds[f"{kind} | {runtime}"] / seconds[f"dense | {runtime}"], 3)})
    return {"tokens": tokens, "ffn_share_of_dense_onnx": round(share, 3),
            "amdahl_bound_split": round(1 - share + share * 0.25, 3), "rows": rows}


# ------------------------------------------------------------------------------------------------ parent

def _child(args: list[str], sizes_name: str, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", *args, "--sizes", sizes_name, "--workdir", str(workdir)]
    print("  running", " ".join(args), flush=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> dict:
    import onnx
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cores": os.cpu_count(),
            "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


def layer_markdown(results: dict) -> str:
    runs = results["runs"]
    variants = list(dict.fromkeys((r["variant"], r["runtime"]) for run in runs for r in run["rows"]))
    head = [f"T={run['tokens']}, {run['threads']} thr" for run in runs]
    lines = ["| variant | runtime | FLOP ideal | " + " | ".join(head) + " |", "|---|---|---|" + "---|" * len(runs)]
    for variant, runtime in variants:
        cells = []
        for run in runs:
            row = next(r for r in run["rows"] if (r["variant"], r["runtime"]) == (variant, runtime))
            cells.append(f"{row['ratio_to_dense']:.2f}x")
        ideal = next(r["flop_ideal"] for r in runs[0]["rows"] if r["variant"] == variant)
        lines.append(f"| {variant} | {runtime} | {ideal:.2f}x | " + " | ".join(cells) + " |")
    dense = " / ".join(f"{next(r['ms'] for r in run['rows'] if r['variant'] == 'dense FFN' and r['runtime'] == rt)} ms"
                       for run in runs for rt in ("onnxruntime",))
    return "\n".join(lines) + f"\n\nDense FFN in ONNX Runtime per column: {dense}.\n"


def model_markdown(results: dict) -> str:
    lines = ["| tokens | runtime | split 8/2 | upcycle 8/2 | Amdahl bound, split | FFN share of dense |",
             "|---|---|---|---|---|---|"]
    for run in results["runs"]:
        for runtime in ("onnxruntime", "eager"):
            ratio = {r["model"]: r["ratio_to_dense"] for r in run["rows"] if r["runtime"] == runtime}
            dense_ms = next(r["ms"] for r in run["rows"] if r["runtime"] == runtime and r["model"] == "dense")
            lines.append(f"| {run['tokens']} | {runtime} (dense {dense_ms} ms) | {ratio['split']:.2f}x | "
                         f"{ratio['upcycle']:.2f}x | {run['amdahl_bound_split']:.2f}x | "
                         f"{run['ffn_share_of_dense_onnx']:.2f} |")
    lines += ["", "| model | convert s | export s | peak RSS after convert MB | peak RSS after export MB |",
              "|---|---|---|---|---|"]
    lines += [f"| {b['model']} | {b['convert_s']} | {b['export_s']} | {b['peak_rss_mb_after_convert']} | "
              f"{b['peak_rss_mb_after_export']} |" for b in results["build"]]
    return "\n".join(lines) + "\n"


def layer_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for run in results["runs"] if run["threads"] == 1]
    fig, ax = plt.subplots(figsize=(8, 5))
    tokens = [run["tokens"] for run in runs]
    for variant, runtime in dict.fromkeys((r["variant"], r["runtime"]) for r in runs[0]["rows"]):
        if variant == "dense FFN" or "routing only" in variant:
            continue
        ratios = [next(r["ratio_to_dense"] for r in run["rows"] if (r["variant"], r["runtime"]) == (variant, runtime))
                  for run in runs]
        ours = not any(peer in variant for peer in ("com.microsoft", "every-expert", "HF loop", "grouped_mm"))
        ax.plot(tokens, ratios, marker="o", linestyle="-" if ours else ":", label=f"{variant} ({runtime})")
    for ideal in (0.25, 2.0):
        ax.axhline(ideal, color="grey", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="time / dense FFN (same runtime)",
           title="MoE FFN vs dense, 1 thread (solid: ours; dotted: peers; grey: FLOP ideals)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_suite(suite: str, sizes_name: str, out: Path, workdir: Path) -> None:
    sizes = FULL if sizes_name == "full" else TINY
    layers_file = workdir / "layers.json"
    if not layers_file.exists():
        layers_file.write_text(json.dumps(_child(["export-layers"], sizes_name, workdir)))
    if suite == "layer":
        runs = [_child(["time-layers", "--tokens", str(t), "--threads", str(n)], sizes_name, workdir)
                for n in sizes.threads for t in sizes.tokens]
        results = {"setup": {**machine(), "sizes": sizes.__dict__}, "runs": runs}
        (out / "layer.md").write_text(f"# Layer benchmark\n\n{json.dumps(results['setup'])}\n\n"
                                      f"{layer_markdown(results)}")
        layer_plot(results, out / "layer.png")
    else:
        build = [_child(["build-model", "--kind", kind], sizes_name, workdir) for kind in ("dense", "split", "upcycle")]
        runs = [_child(["time-model", "--tokens", str(t)], sizes_name, workdir) for t in sizes.model_tokens]
        results = {"setup": {**machine(), "sizes": sizes.__dict__}, "build": build, "runs": runs}
        (out / "model.md").write_text(f"# Model benchmark\n\n{json.dumps(results['setup'])}\n\n"
                                      f"{model_markdown(results)}")
    (out / f"{suite}.json").write_text(json.dumps(results, indent=1) + "\n")
    print((out / f"{suite}.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["layer", "model", "all"], default="all")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="full", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _quiet()
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        sizes = FULL if args.sizes == "full" else TINY
        jobs = {"export-layers": lambda: child_export_layers(sizes, args.workdir),
                "time-layers": lambda: child_time_layers(sizes, args.workdir, args.tokens, args.threads),
                "build-model": lambda: child_build_model(sizes, args.workdir, args.kind),
                "time-model": lambda: child_time_model(sizes, args.workdir, args.tokens)}
        print(json.dumps(jobs[args.child]()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for suite in (["layer", "model"] if args.suite == "all" else [args.suite]):
            print(f"suite {suite}:", flush=True)
            run_suite(suite, "tiny" if args.tiny else "full", args.out, Path(tmp))


if __name__ == "__main__":
    main()
