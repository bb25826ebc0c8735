"""Decode benchmark: text generation with a KV cache, dense vs split 8/2 (float32, int4 experts) vs upcycled 8/2.

    python benchmarks/decode.py                  # writes benchmarks/results/decode.{json,md,png}
    python benchmarks/decode.py --tiny --out DIR # a tiny configuration (CI checks that it runs)
    python benchmarks/decode.py --batches 1 --name decode_batch1   # a subset, to its own result files

Models (random weights, fp32, with their LM heads): a GPT-2-small shape (12 layers, d 768, 12 heads, vocab 50257)
and a LLaMA shape of similar size (12 layers, d 768, d_ff 2048 SwiGLU, 12 heads, 4 KV heads, vocab 32000).
Each is exported with export(task="text-generation") (target portable) and run by our runner (ONNX Runtime,
1 intra-op thread), and run by transformers' generate in eager PyTorch (1 thread): batch 1 and 8, prompts of 128
and 512 tokens, 128 new tokens (no stop token). Time to first token = the prefill call (our runner), or the
time until a streamer receives the first new token (eager); per-token latency = the median decode step (ours), or
the mean time between the first and the last streamed token (eager). All variants of one model are timed in one
process, in round-robin rounds, and each figure is the median over rounds; the ratios compare variants measured
side by side.

"split 8/2 int4": the split model after quantize_experts(bits=4, block_size=32), its experts run by ONNX Runtime
as MatMulNBits in float32 (accuracy level 0, as parity needs); in eager it is the float32 split model's speed, so
it is timed in ONNX Runtime only. "(ort)": the same model exported with target="ort" (float32 experts as
com.microsoft.MoE nodes, int4 experts as com.microsoft.QMoE; attention fused into GroupQueryAttention over the
cache, which our runner preallocates and the op writes in place), compared with the dense model exported the same
way. KV cache: its size after the last step (the preallocated buffers on the ort target).

Prefill's Amdahl bound for split 8/2: 1 - s + 0.25 s, with s the FFNs' share of the dense prefill time, measured
on the same export with every FFN replaced by zeros.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RESULTS, machine  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    layers: int
    d_model: int
    heads: int
    kv_heads: int
    llama_d_ff: int
    gpt2_vocab: int
    llama_vocab: int
    batches: tuple[int, ...]
    prompts: tuple[int, ...]
    new_tokens: int
    rounds: int
    int4_block: int = 32  # weights per scale of the int4 experts


FULL = Sizes(12, 768, 12, 4, 2048, 50257, 32000, (1, 8), (128, 512), 128, rounds=3)
TINY = Sizes(2, 64, 4, 2, 128, 256, 256, (2,), (8,), 4, rounds=1, int4_block=16)
VARIANTS = ("dense", "split 8/2", "split 8/2 int4", "upcycle 8/2", "no FFN", "dense (ort)", "split 8/2 (ort)",
            "split 8/2 int4 (ort)")
ORT = " (ort)"  # a variant exported with target="ort", compared with dense (ort)
EAGER = ("dense", "split 8/2", "upcycle 8/2")  # eager runs int4 experts as their float32 dequantised weights


def build(family: str, sizes: Sizes):
    import torch
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=sizes.layers, n_embd=sizes.d_model, n_head=sizes.heads,
                                         vocab_size=sizes.gpt2_vocab, n_positions=1024)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.LlamaConfig(num_hidden_layers=sizes.layers, hidden_size=sizes.d_model,
                                      intermediate_size=sizes.llama_d_ff, num_attention_heads=sizes.heads,
                                      num_key_value_heads=sizes.kv_heads, vocab_size=sizes.llama_vocab,
                                      max_position_embeddings=1024)
    return transformers.LlamaForCausalLM(config).eval()


def variant(dense, name: str, sizes: Sizes):
    import torch
    import torch.nn as nn

    import moe_compile as mc
    from moe_compile.moe import iter_moe_layers
    from moe_compile.passes.rewrite import replace_submodule

    if name == "dense":
        return dense
    experts = "upcycle" if name.startswith("upcycle") else "split"
    model = mc.convert(dense, mc.MoEConfig(num_experts=8, top_k=2, experts=experts))
    if name.endswith("int4"):
        mc.quantize_experts(model, bits=4, block_size=sizes.int4_block)
    if name == "no FFN":  # the same model with every FFN's output zero: what the FFNs cost, for the Amdahl bound
        class Zero(nn.Module):
            def forward(self, x):
                return torch.zeros_like(x)

        for layer_name, _ in list(iter_moe_layers(model)):
            model = replace_submodule(model, layer_name, Zero())
    return model


def time_ours(directory: Path, prompts, new_tokens: int):
    from moe_compile import Generator

    generator = Generator(directory, threads=1)
    result = generator.generate(prompts, new_tokens, stop_tokens=[])
    return result.time_to_first_token_s, result.per_token_latency_s, result.kv_cache_bytes


def time_eager(model, prompts, new_tokens: int):
    """(time to first token, per-token latency) of transformers' generate, both read from one run: a streamer
    stamps the clock as each token comes out."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.stamps = []

        def put(self, value):  # the prompt first, then each step's new tokens
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    ids, clock = torch.tensor(prompts), Clock()
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock, **options)
    steps = clock.stamps[-new_tokens:]
    return steps[0] - start, (steps[-1] - steps[0]) / max(1, new_tokens - 1)


def _directory(workdir: Path, family: str, variant_name: str) -> Path:
    return workdir / f"{family}-{variant_name.replace(' ', '-').replace('/', '-')}"


def run_family(family: str, sizes: Sizes, workdir: Path) -> dict:
    import torch

    import moe_compile as mc

    torch.set_num_threads(1)
    dense = build(family, sizes)
    models, exports = {}, []
    for name in VARIANTS:
        base = name.removesuffix(ORT)  # the same model, exported for another target
        models[name] = models[base] if base != name else variant(dense, name, sizes)
        start = time.perf_counter()
        mc.export(models[name], None, _directory(workdir, family, name), task="text-generation",
                  target="ort" if name.endswith(ORT) else "portable")
        exports.append({"variant": name, "export_s": round(time.perf_counter() - start, 1)})
        print(f"  exported {family} {name}", file=sys.stderr, flush=True)
    vocab = models["dense"].config.vocab_size
    rows = []
    for batch in sizes.batches:
        for prompt in sizes.prompts:
            g = torch.Generator().manual_seed(batch * 1000 + prompt)
            prompts = torch.randint(0, vocab, (batch, prompt), generator=g).tolist()
            samples = {}
            for _ in range(sizes.rounds):
                for name in VARIANTS:
                    samples.setdefault((name, "onnxruntime"), []).append(
                        time_ours(_directory(workdir, family, name), prompts, sizes.new_tokens))
                    if name in EAGER:
                        samples.setdefault((name, "eager"), []).append(
                            time_eager(models[name], prompts, sizes.new_tokens) + (None,))
            for (name, runtime), runs in samples.items():
                ttft = statistics.median(r[0] for r in runs)
                step = statistics.median(r[1] for r in runs)
                rows.append({"batch": batch, "prompt": prompt, "variant": name, "runtime": runtime,
                             "ttft_ms": round(ttft * 1e3, 1), "per_token_ms": round(step * 1e3, 2),
                             "kv_cache_mib": None if runs[0][2] is None else round(runs[0][2] / 2 ** 20, 1)})
            print(f"  timed {family} batch {batch} prompt {prompt}", file=sys.stderr, flush=True)
    for row in rows:  # ratios to dense in the same runtime and target, same batch and prompt
        base = "dense" + (ORT if row["variant"].endswith(ORT) else "")
        dense_row = next(r for r in rows if (r["batch"], r["prompt"], r["runtime"], r["variant"]) ==
                         (row["batch"], row["prompt"], row["runtime"], base))
        row["ttft_ratio"] = round(row["ttft_ms"] / dense_row["ttft_ms"], 3)
        row["per_token_ratio"] = round(row["per_token_ms"] / dense_row["per_token_ms"], 3)
        if row["runtime"] == "onnxruntime" and row["variant"] == "split 8/2":
            no_ffn = next(r for r in rows if (r["batch"], r["prompt"], r["runtime"], r["variant"]) ==
                          (row["batch"], row["prompt"], "onnxruntime", "no FFN"))
            share = 1 - no_ffn["ttft_ms"] / dense_row["ttft_ms"]
            row["ffn_share_of_dense_prefill"] = round(share, 3)
            row["prefill_amdahl_bound"] = round(1 - share + 0.25 * share, 3)
    return {"family": family, "exports": exports, "rows": rows}


def markdown(results: dict) -> str:
    lines = ["| model | batch | prompt | runtime | dense TTFT / per token | split 8/2 TTFT / per token | "
             "split 8/2 int4 experts | ort target: dense TTFT / per token | split 8/2 (MoE op) / dense ort | "
             "split 8/2 int4 (QMoE) / dense ort | upcycle 8/2 TTFT / per token | split prefill Amdahl bound | "
             "KV cache (ours) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for family in results["families"]:
        for row in family["rows"]:
            if row["variant"] != "dense":
                continue
            key = (row["batch"], row["prompt"], row["runtime"])
            by = {r["variant"]: r for r in family["rows"] if (r["batch"], r["prompt"], r["runtime"]) == key}
            split, upcycle = by["split 8/2"], by["upcycle 8/2"]
            int4_cell, moe_cell, qmoe_cell = (
                "-" if r is None else f"{r['ttft_ratio']:.2f}x / {r['per_token_ratio']:.2f}x"
                for r in (by.get("split 8/2 int4"), by.get("split 8/2" + ORT), by.get("split 8/2 int4" + ORT)))
            dense_ort = by.get("dense" + ORT)
            dense_ort_cell = "-" if dense_ort is None else f"{dense_ort['ttft_ms']} ms / {dense_ort['per_token_ms']} ms"
            bound = split.get("prefill_amdahl_bound")
            cache = "-" if row["kv_cache_mib"] is None else f"{row['kv_cache_mib']} MiB"
            lines.append(
                f"| {family['family']} | {row['batch']} | {row['prompt']} | {row['runtime']} | "
                f"{row['ttft_ms']} ms / {row['per_token_ms']} ms | {split['ttft_ratio']:.2f}x / "
                f"{split['per_token_ratio']:.2f}x | {int4_cell} | {dense_ort_cell} | {moe_cell} | {qmoe_cell} | "
                f"{upcycle['ttft_ratio']:.2f}x / "
                f"{upcycle['per_token_ratio']:.2f}x | "
                f"{'-' if bound is None else f'{bound:.2f}x'} | {cache} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results["families"]), figsize=(6 * len(results["families"]), 4.5), squeeze=False)
    for ax, family in zip(axes[0], results["families"]):
        settings = sorted({(r["batch"], r["prompt"]) for r in family["rows"]})
        labels = [f"b{b} p{p}" for b, p in settings]
        for name, runtime, style in (("split 8/2", "onnxruntime", "-o"), ("split 8/2 int4", "onnxruntime", "-^"),
                                     ("split 8/2" + ORT, "onnxruntime", "-D"),
                                     ("split 8/2 int4" + ORT, "onnxruntime", "-v"),
                                     ("upcycle 8/2", "onnxruntime", "-s"),
                                     ("split 8/2", "eager", ":o"), ("upcycle 8/2", "eager", ":s")):
            ratios = [next(r["per_token_ratio"] for r in family["rows"] if (r["batch"], r["prompt"], r["variant"],
                      r["runtime"]) == (b, p, name, runtime)) for b, p in settings]
            ax.plot(labels, ratios, style, label=f"{name} ({runtime})")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(title=f"{family['family']}: decode step time / dense (same runtime)", ylabel="ratio to dense")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--family", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8)")
    parser.add_argument("--prompts", type=int, nargs="+", help="prompt lengths (default 128 512)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="decode", help="result files NAME.{json,md,png} (default decode)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    sizes = TINY if args.tiny else FULL
    sizes = dataclasses.replace(sizes, batches=tuple(args.batches or sizes.batches),
                                prompts=tuple(args.prompts or sizes.prompts))
    args.out.mkdir(parents=True, exist_ok=True)
    setup = {**machine(), "sizes": sizes.__dict__}
    with tempfile.TemporaryDirectory() as tmp:
        families = [run_family(family, sizes, Path(tmp)) for family in args.family]
    results = {"setup": setup, "families": families}
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(f"# Decode benchmark\n\n{json.dumps(setup)}\n\n{markdown(results)}")
    plot(results, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
