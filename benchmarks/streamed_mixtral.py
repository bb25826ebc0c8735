"""Streamed conversion of a ~1B-parameter LLaMA checkpoint into a Mixtral checkpoint: peak memory and time.

Setup: a LLaMA-shaped checkpoint (TinyLlama-1.1B's shape: d = 2048, d_ff = 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000; 1.1B parameters) with random weights, bf16, written locally in 1 GiB safetensors shards
without ever building the model; then `moe-compile convert --hf SRC --out DST --format hf --num-experts 8
--top-k 2` (upcycle, token-choice top-2) runs in a child process, whose peak resident memory (VmHWM) and
wall time are recorded, next to those of a child that only imports the same modules.

Bound: peak RSS < 1.5 x the largest input shard + one MoE layer (the largest output layer shard).
Checks: the Mixtral checkpoint builds in transformers on the meta device with every parameter present in the
shards at the right shape (experts stacked the way transformers fuses them); and a 2-layer slice (the first two
decoder layers, with embeddings, norm and head) loaded by transformers gives the logits of the same 2-layer
dense model converted in memory with moe_compile.convert (fp32 compute on the same bf16 weights).

Writes benchmarks/results/streamed_mixtral.{json,md}. The temporary checkpoints (2.2 GB + ~13 GB) are deleted.

    nice -n 10 python benchmarks/streamed_mixtral.py [--size 1b|tiny] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import moe_compile as mc

EXPERTS, TOP_K = 8, 2
SIZES = {  # LlamaConfig fields, input shard size in bytes
    "1b": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000), 1 << 30),
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128), 64 << 10),
}
RESULTS = Path(__file__).resolve().parent / "results"
CONVERT_ARGS = ["--format", "hf", "--num-experts", str(EXPERTS), "--top-k", str(TOP_K)]
# VmHWM, the peak RSS of this process's own address space (ru_maxrss would also count the parent's RSS at fork)
CHILD = """
import json, re, sys, time
start = time.perf_counter()
from moe_compile.cli import main
import transformers
rc = main(sys.argv[1:]) if len(sys.argv) > 1 else 0
peak_kib = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_kib * 1024}))
"""


def write_dense_checkpoint(directory: Path, config: transformers.LlamaConfig, shard_bytes: int) -> list[Path]:
    """A random bf16 LLaMA checkpoint in shards of at most `shard_bytes`, holding one shard in memory at a time
    (names and shapes from the model built on the meta device)."""
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in transformers.LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    parts, shard, weight_map = [], {}, {}

    def flush():
        parts.append(directory / f"part-{len(parts)}.safetensors")
        save_file(shard, str(parts[-1]), metadata={"format": "pt"})
        shard.clear()

    for name, shape in shapes.items():
        scale, offset = (0.1, 1.0) if name.endswith("norm.weight") else (config.initializer_range, 0.0)
        tensor = (offset + scale * torch.randn(shape, generator=generator)).to(torch.bfloat16)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > shard_bytes:
            flush()
        shard[name] = tensor
    flush()
    paths = [directory / f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for part, path in zip(parts, paths):  # the names transformers gives shards
        part.rename(path)
        with safe_open(str(path), framework="pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), path.name))
    index = {"metadata": {"total_size": sum(p.stat().st_size for p in paths)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(directory)
    return paths


def run_child(args: list[str]) -> dict:
    """Run CHILD (the CLI with `args`, or only its imports) in a fresh process: its exit code, time, peak RSS."""
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if done.returncode != 0 or json.loads(done.stdout.strip().splitlines()[-1])["rc"] != 0:
        raise RuntimeError(f"the conversion failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_meta_build(directory: Path) -> int:
    """Build the checkpoint's model on the meta device and check each parameter against the shard headers
    (transformers fuses experts.{e}.w1 / w3 into experts.gate_up_proj [E, 2m, d] and w2 into down_proj);
    returns the parameter count."""
    config = transformers.AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {}
    for path in directory.glob("model-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    for name, param in model.named_parameters():
        legacy = name.replace(".mlp.", ".block_sparse_moe.")
        if name.endswith("experts.gate_up_proj"):
            e, two_m, d = param.shape
            parts = [shapes[legacy.replace("gate_up_proj", f"{i}.{w}.weight")] for i in range(e) for w in ("w1", "w3")]
            assert all(shape == (two_m // 2, d) for shape in parts), name
        elif name.endswith("experts.down_proj"):
            e, d, m = param.shape
            assert all(shapes[legacy.replace("down_proj", f"{i}.w2.weight")] == (d, m) for i in range(e)), name
        else:
            assert shapes[legacy] == tuple(param.shape), name
    return sum(p.numel() for p in model.parameters())


def check_two_layer_slice(source: Path, directory: Path, ids: torch.Tensor) -> float:
    """max |logits| difference between transformers' 2-layer Mixtral slice of the checkpoint and our in-memory
    conversion of the same 2-layer dense model (both run in fp32 on the same bf16 weights)."""
    dense_config = transformers.AutoConfig.from_pretrained(source, num_hidden_layers=2)
    dense = transformers.LlamaForCausalLM(dense_config)
    for param in dense.parameters():  # bf16 weights, as streamed; buffers (RoPE frequencies) stay fp32
        param.data = param.data.to(torch.bfloat16)
    state = {}
    for path in source.glob("model-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()
                          if not name.startswith("model.layers.") or int(name.split(".")[2]) < 2})
    dense.load_state_dict(state, strict=True)
    moe = mc.convert(dense.eval(), mc.MoEConfig(num_experts=EXPERTS, top_k=TOP_K)).float().eval()
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(directory, num_hidden_layers=2,
                                                                dtype=torch.float32).eval()
    with torch.no_grad():
        return (mixtral(ids).logits - moe(ids).logits).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="1b")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()

    fields, shard_bytes = SIZES[args.size]
    config = transformers.LlamaConfig(**fields, dtype="bfloat16", initializer_range=0.02)
    with tempfile.TemporaryDirectory(prefix="streamed_mixtral_") as tmp:
        source, out = Path(tmp) / "dense", Path(tmp) / "mixtral"
        source.mkdir()
        inputs = write_dense_checkpoint(source, config, shard_bytes)
        with torch.device("meta"):
            parameters = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
        baseline = run_child([])
        converted = run_child(["convert", "--hf", str(source), "--out", str(out), *CONVERT_ARGS])
        outputs = sorted(out.glob("model-*.safetensors"))
        largest_input = max(p.stat().st_size for p in inputs)
        moe_layer = max(p.stat().st_size for p in outputs[1:])
        bound = 1.5 * largest_input + moe_layer
        ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        result = {
            "setup": {"dense": {**fields, "dtype": "bfloat16", "parameters": parameters},
                      "moe": {"num_experts": EXPERTS, "top_k": TOP_K, "experts": "upcycle",
                              "routing": "token_choice"},
                      "command": "moe-compile convert --hf SRC --out DST " + " ".join(CONVERT_ARGS),
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "note": "shared machine, run under nice -n 10: times are indicative only"},
            "input_shards": len(inputs), "largest_input_shard_bytes": largest_input,
            "output_shards": len(outputs), "output_bytes": sum(p.stat().st_size for p in outputs),
            "moe_layer_bytes": moe_layer,
            "peak_rss_bytes": converted["peak_rss_bytes"], "runtime_only_peak_rss_bytes": baseline["peak_rss_bytes"],
            "bound_bytes": int(bound), "below_bound": converted["peak_rss_bytes"] < bound,
            "convert_seconds": round(converted["seconds"], 1),
            "meta_device_parameters": check_meta_build(out),
            "two_layer_slice_max_abs_logit_diff": check_two_layer_slice(source, out, ids),
        }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "streamed_mixtral.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "streamed_mixtral.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    def mib(n: int) -> str:
        return f"{n / 2**20:,.1f} MiB"

    rows = [
        ("dense checkpoint", f"{r['setup']['dense']['parameters'] / 1e6:,.1f}M parameters, bf16, "
                             f"{r['input_shards']} shards, largest {mib(r['largest_input_shard_bytes'])}"),
        ("Mixtral checkpoint", f"{EXPERTS} experts top-{TOP_K}, {r['meta_device_parameters'] / 1e6:,.1f}M "
                               f"parameters, {r['output_shards']} shards, {mib(r['output_bytes'])}"),
        ("one MoE layer (largest layer shard)", mib(r["moe_layer_bytes"])),
        ("peak RSS, conversion", mib(r["peak_rss_bytes"])),
        ("peak RSS, a process that only imports", mib(r["runtime_only_peak_rss_bytes"])),
        ("bound: 1.5 x largest input shard + one MoE layer",
         f"{mib(r['bound_bytes'])} ({'below' if r['below_bound'] else 'ABOVE'})"),
        ("wall time, conversion", f"{r['convert_seconds']} s ({r['setup']['note']})"),
        ("2-layer slice in transformers vs moe_compile.convert",
         f"max abs logit difference {r['two_layer_slice_max_abs_logit_diff']:.2e} (fp32)"),
    ]
    lines = ["# Streamed conversion to Mixtral", "", f"`{r['setup']['command']}`", "", "| | |", "|---|---|"]
    return "\n".join(lines + [f"| {a} | {b} |" for a, b in rows]) + "\n"


if __name__ == "__main__":
    main()
