"""moe-compile: inspect, convert, export and check the MoE conversion of GPT-style models.

    moe-compile inspect (--example NAME | --checkpoint FILE | --hf DIR | --gguf FILE | --model DIR) [MoEConfig flags]
    moe-compile convert (--example NAME | --checkpoint FILE | --hf DIR | --gguf FILE) --out DIR
                        [--format moe_compile|hf] [--calibrate | --calibration-text FILE ...]
                        [--expert-bits 4|8 --block-size B] [MoEConfig flags]
    moe-compile eval (--checkpoint FILE | --hf DIR | --gguf FILE | --example NAME) [--active F ...] [--text FILE ...]
                     [--no-calibration | --calibration-text FILE ...] [--json FILE] [MoEConfig flags]
    moe-compile optimize (--checkpoint FILE | --hf DIR | --gguf FILE | --example NAME) (--budget F | --quality Q)
                         --out DIR [--top-k K ...] [--cost flops|latency --target T --threads N] [--text FILE ...]
                         [--calibration-text FILE ...] [MoEConfig flags]
    moe-compile heal MODEL_DIR (--hf DIR | --gguf FILE | --checkpoint FILE | --example NAME) --out DIR
                     [--tokens N] [--text FILE ...] [--eval-text FILE ...] [--loss ...] [--checkpoint-dir DIR]
    moe-compile export MODEL_DIR --target {ort,portable,tensorrt} --out FILE.onnx [--dtype fp32|fp16|bf16]
                       [--batch B --seq S] [--engine FILE.engine --max-batch B --max-seq S]
    moe-compile export MODEL_DIR --task text-generation --target {ort,portable,tensorrt} --out DIR [--dtype ...]
                       [--window-cache] [--logits all|last]
    moe-compile check MODEL_DIR FILE.onnx|FILE.engine|DIR [--json] [--dtype fp32|fp16|bf16] [--batch B --seq S]
                      [--steps N]
    moe-compile generate DIR (--prompt TEXT ... | --ids "ID ID ..." ...) [--max-new-tokens N] [--sample
                         --temperature T --top-k K --top-p P --seed S] [--threads N]

MODEL_DIR: a directory written by moe-compile convert, or a Hugging Face model directory (the dense baseline).

Bad input prints one line `moe-compile: error: ...` to stderr and exits 2; a failed parity check exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .config import (
    COMBINES,
    EXPERT_BUILDERS,
    ROUTER_INITS,
    ROUTINGS,
    SPLIT_STRATEGIES,
    MoEConfig,
)
from .evaluate import evaluate_split, evaluation_table
from .example_models import EXAMPLE_MODELS, build_example, load_checkpoint
from .example_text import calibration_batches, score, stdlib_text, token_ids
from .heal import LOSSES, heal
from .hf_checkpoint import convert_hf_checkpoint
from .moe.quantize import quantize_experts
from .optimize import COSTS, LATENCY_TARGETS, optimize
from .passes import convert, find_ffn_blocks
from .serialization import RECIPE_FILE, load, save
from .stats import model_stats

PROG = "moe-compile"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # bf16: target tensorrt
EXPORT_SHAPE = (2, 16)  # [batch, seq] of the token ids for export and for convert's torch.export search
CHECK_SHAPE = (3, 23)  # check runs another shape by default, so a graph fixed to the export shape fails

def _shared_count(text: str):
    if text == "auto" or text.isdigit():
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a count of neuron groups: give an integer >= 0, or auto")


def _budget(text: str):
    """optimize --budget: a share of the dense cost, or a candidate's k/E (kept as text for optimize)."""
    if "/" in text:
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a budget: give a share of the dense FFN cost (e.g. 0.5) "
                                         "or a candidate's k/E (e.g. 4/8)") from None


def _split(text: str) -> tuple[int, int]:
    """optimize --candidates: a split k/E, k of E experts active per token."""
    try:
        k, experts = map(int, text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a candidate: give k/E, k of E split experts active per "
                                         "token (e.g. 4/16)") from None
    return k, experts


# MoEConfig fields settable from the command line: flag -> (type, help)
CONFIG_FLAGS = {
    "num_experts": (int, "experts per FFN site (default 8)"),
    "top_k": (int, "experts per token (default 1 for switch, 2 otherwise)"),
    "routing": (str, f"one of {', '.join(ROUTINGS)} (default token_choice)"),
    "experts": (str, f"expert builder, one of {', '.join(EXPERT_BUILDERS)} (default upcycle)"),
    "split_strategy": (str, f"for split experts, one of {', '.join(SPLIT_STRATEGIES)} (default kmeans)"),
    "router_init": (str, f"one of {', '.join(ROUTER_INITS)} (default centroid for split, random for upcycle)"),
    "capacity_factor": (float, "expert capacity factor (default: the routing's)"),
    "combine": (str, f"one of {', '.join(COMBINES)} (default unweighted for split, weighted for upcycle)"),
    "upcycle_noise": (float, "std of the noise added to upcycled experts, relative to the weights' (default 0)"),
    "shared_experts": (_shared_count,
                       "split: neuron groups always on, out of top_k, or 'auto' (calibrated default: the count of "
                       "least held-out error of 0, k/4, k/2, 3k/4; else 0)"),
    "compensate": (bool, "split: a skipped expert adds its mean calibration output (calibrated default on)"),
    "distill_steps": (int, "split: optimiser steps per layer fitting experts to the dense FFN (calibrated default "
                           "200, else 0)"),
    "calibration_tokens": (int, "token rows recorded per FFN site from the calibration text (default 8192)"),
    "seed": (int, "seed of expert building and router initialisation (default 0)"),
}


class UsageError(Exception):
    """Bad command-line input; main prints it on one line and exits 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 parity failed, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
        return args.handler(args)
    # ValueError covers MoEConfig and every MoECompileError; ImportError an optional runtime (TensorRT) missing
    except (UsageError, ValueError, OSError, ImportError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Convert the dense FFNs of GPT-style models into sparse MoE.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="FFN sites, shapes, parameters and FLOPs, dense vs MoE")
    _add_source(inspect, saved=True)
    _add_config_flags(inspect)
    inspect.set_defaults(handler=_inspect)

    conv = commands.add_parser("convert", help="convert a model and save it (weights + recipe)")
    _add_source(conv, saved=False)
    conv.add_argument("--out", required=True, metavar="DIR", help="directory to save the converted model to")
    conv.add_argument("--format", choices=("moe_compile", "hf"), default="moe_compile",
                      help="moe_compile: weights + recipe (moe_compile.load reads it; every routing); hf: a "
                           "Mixtral / Qwen2-MoE checkpoint from a LLaMA / Mistral / Qwen2 --hf directory, converted "
                           "one layer at a time (default moe_compile)")
    conv.add_argument("--calibrate", action="store_true",
                      help="build split experts from activations on calibration text (the standard library's "
                           "source unless --calibration-text is given)")
    _add_calibration_flags(conv)
    conv.add_argument("--expert-bits", type=int, choices=(4, 8),
                      help="round the experts' weights to 4- or 8-bit integers in blocks (weight-only; the export "
                           "writes them as such, ONNX Runtime runs MatMulNBits)")
    conv.add_argument("--block-size", type=int, default=32, help="weights per scale with --expert-bits (32)")
    _add_config_flags(conv)
    conv.set_defaults(handler=_convert)

    evaluate = commands.add_parser("eval", help="validation perplexity of split experts against dense, per active "
                                                "FFN fraction",
                                   description="Convert with split experts (eval's default for --experts) at each "
                                               "active fraction, top_k = F * num_experts, and measure validation "
                                               "perplexity against the dense model.")
    _add_source(evaluate, saved=False)
    evaluate.add_argument("--active", type=float, nargs="+", default=[0.125, 0.25, 0.5, 0.75], metavar="F",
                          help="active FFN fractions; top_k = F * num_experts (default 0.125 0.25 0.5 0.75)")
    evaluate.add_argument("--text", nargs="+", metavar="FILE",
                          help="validation text files (default: the standard library's validation split)")
    evaluate.add_argument("--windows", type=int, default=128, help="validation windows (128)")
    evaluate.add_argument("--no-calibration", action="store_true", help="measure data-free split experts")
    _add_calibration_flags(evaluate)
    evaluate.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    _add_config_flags(evaluate)
    evaluate.set_defaults(handler=_eval)

    optimizing = commands.add_parser(
        "optimize", help="choose per layer dense or k of E split experts, for an active-FFN or a quality budget",
        description="Convert with every candidate (k of --num-experts split experts for each --top-k, or each "
                    "--candidates k/E; calibrated), "
                    "measure each on every layer on held-out text and, around the best within the goal, each "
                    "layer's change of divergence from dense when it alone takes another choice; then choose per "
                    "layer dense or a candidate: the least predicted loss within --budget (a share of the dense "
                    "FFN's FLOPs, or of its ONNX Runtime latency with --cost latency), or the least cost within "
                    "--quality (perplexity as a multiple of dense). Where plans chosen on half the windows do not "
                    "gain on the other half, the gain is noise and the best uniform conversion is kept. Saves the "
                    "model to --out.")
    _add_source(optimizing, saved=False)
    goal = optimizing.add_mutually_exclusive_group(required=True)
    goal.add_argument("--budget", type=_budget, metavar="F|K/E",
                      help="share of the dense FFN cost (e.g. 0.5): FLOPs, or latency with --cost latency; or a "
                           "candidate (e.g. 4/8): its cost on every layer, measured in the same run")
    goal.add_argument("--quality", type=float, metavar="Q", help="perplexity allowed, a multiple of dense (e.g. 1.5)")
    optimizing.add_argument("--out", required=True, metavar="DIR", help="directory to save the converted model to")
    optimizing.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4, 6], metavar="K",
                            help="the candidates' experts per token, of --num-experts split experts (1 2 4 6)")
    optimizing.add_argument("--candidates", type=_split, nargs="+", metavar="K/E",
                            help="candidates of any expert counts, k of E active (e.g. 2/8 3/16 4/16 5/16), instead "
                                 "of --top-k of --num-experts")
    optimizing.add_argument("--text", nargs="+", metavar="FILE", help="held-out text the layers' sensitivity is "
                                                                      "measured on (default: the standard library's "
                                                                      "validation split)")
    optimizing.add_argument("--windows", type=int, default=16, help="held-out windows (16)")
    optimizing.add_argument("--cost", choices=COSTS, default="flops",
                            help="what the budget is a share of: FFN FLOPs per token, or each layer's latency in "
                                 "ONNX Runtime, timed once per layer shape (flops)")
    optimizing.add_argument("--target", choices=LATENCY_TARGETS, default="portable",
                            help="--cost latency: the export target the layers are timed in (portable)")
    optimizing.add_argument("--threads", type=int, default=1, help="--cost latency: ONNX Runtime threads (1)")
    optimizing.add_argument("--latency-tokens", type=int, default=512,
                            help="--cost latency: tokens per timed layer call (512)")
    _add_calibration_flags(optimizing)
    optimizing.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    optimizing.add_argument("--plot", metavar="FILE.png", help="also draw the frontier searched (needs matplotlib)")
    _add_config_flags(optimizing, skip=("top_k", "experts"))
    optimizing.set_defaults(handler=_optimize)

    healing = commands.add_parser("heal", help="train a converted model to its dense source, end to end",
                                  description="Train MODEL_DIR's MoE layers so that its output distribution (and block "
                                              "outputs) match the dense model it was converted from (the --hf, --gguf, "
                                              "--checkpoint or --example source), on windows of --text; held-out "
                                              "perplexity before, during and after; saves the healed model to --out.")
    healing.add_argument("model_dir", metavar="MODEL_DIR", help="a converted model saved by moe-compile convert")
    _add_source(healing, saved=False)
    healing.add_argument("--out", required=True, metavar="DIR", help="directory to save the healed model to")
    healing.add_argument("--tokens", type=int, default=100_000, help="training tokens (100000)")
    healing.add_argument("--text", nargs="+", metavar="FILE",
                         help="training text files (default: the standard library's training split)")
    healing.add_argument("--paragraphs", action="store_true",
                         help="train on each paragraph of the text (between blank lines) as one sample with the "
                              "tokenizer's special tokens, not on windows of it joined: what a sentence encoder sees")
    healing.add_argument("--eval-text", nargs="+", metavar="FILE",
                         help="held-out text files (default: the standard library's validation split)")
    healing.add_argument("--eval-every", type=int, metavar="TOKENS", help="measure held-out perplexity every TOKENS "
                                                                          "training tokens (default: before and after)")
    healing.add_argument("--eval-windows", type=int, default=8, help="held-out windows per measurement (8)")
    healing.add_argument("--length", type=int, help="tokens per window (default: the model's context, at most 128)")
    healing.add_argument("--batch-size", type=int, default=4, help="windows per step (4)")
    healing.add_argument("--loss", choices=LOSSES,
                         help="logits: KL of the output distributions at --positions sampled positions per window "
                              "(any model); hidden: every block's output (transformers models), no LM head "
                              "(default logits+hidden for transformers models, logits otherwise)")
    healing.add_argument("--positions", type=int, default=64,
                         help="positions per window whose logits are scored (64)")
    healing.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    healing.add_argument("--train", choices=("moe", "all"), default="moe",
                         help="parameters trained: the MoE layers' or all (default moe)")
    healing.add_argument("--checkpoint-dir", metavar="DIR", help="save the run there, and resume from it")
    healing.add_argument("--seed", type=int, default=0, help="seed of the training windows (0)")
    healing.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    healing.set_defaults(handler=_heal)

    export = commands.add_parser("export", help="lower a saved MoE model (or a dense HF model) to ONNX")
    export.add_argument("model_dir", metavar="MODEL_DIR", help="a directory written by moe-compile convert, or a "
                                                               "Hugging Face model directory")
    export.add_argument("--target", required=True, choices=("ort", "portable", "tensorrt"))
    export.add_argument("--task", choices=("forward", "text-generation"), default="forward",
                        help="forward: one ONNX file of the model's forward; text-generation: a directory with a "
                             "decoder that takes and returns the KV cache, for moe-compile generate, optimum and "
                             "onnxruntime-genai (default forward)")
    export.add_argument("--window-cache", action="store_true",
                        help="text-generation: sliding-window layers (Gemma 2/3, Mistral-style) keep only their "
                             "window in the cache; for moe-compile generate only (the clients size every layer's "
                             "cache alike)")
    export.add_argument("--logits", choices=("all", "last"), default="all",
                        help="text-generation: the LM head at every position (all, default) or at the last one "
                             "only (last: all that generating needs; saves an LM head per prompt token)")
    export.add_argument("--out", required=True, metavar="FILE.onnx|DIR")
    _add_run_flags(export, EXPORT_SHAPE, "precision of the ONNX graph (default: the model's; bf16 for tensorrt)")
    engine = export.add_argument_group("TensorRT engine (target tensorrt; needs TensorRT and a GPU)")
    engine.add_argument("--engine", metavar="FILE.engine", help="also build a TensorRT engine from the ONNX file")
    engine.add_argument("--max-batch", type=int, default=8, help="largest batch the engine takes (8)")
    engine.add_argument("--max-seq", type=int, default=1024, help="longest sequence the engine takes (1024)")
    export.set_defaults(handler=_export)

    check = commands.add_parser("check", help="run an ONNX file (or TensorRT engine) and compare it with eager PyTorch")
    check.add_argument("model_dir", metavar="MODEL_DIR", help="the directory the ONNX file was exported from")
    check.add_argument("onnx_path", metavar="FILE.onnx|FILE.engine|DIR",
                       help="an ONNX file, a TensorRT engine, or a text-generation export directory (checked as a "
                            "generator: --batch prompts of --seq tokens, --steps decode steps)")
    check.add_argument("--json", action="store_true", help="print the parity report as JSON")
    check.add_argument("--steps", type=int, default=32, help="decode steps of a text-generation check (32)")
    _add_run_flags(check, CHECK_SHAPE, "precision the ONNX file was exported in (default: read from the file)")
    check.set_defaults(handler=_check)

    generate = commands.add_parser("generate", help="generate text with a text-generation export, in ONNX Runtime")
    generate.add_argument("directory", metavar="DIR", help="a directory written by export --task text-generation")
    prompts = generate.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", nargs="+", metavar="TEXT", help="prompts (a batch), read by DIR's tokenizer")
    prompts.add_argument("--ids", nargs="+", metavar='"ID ID ..."', help="prompts as token ids, one string each")
    generate.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt at most (32)")
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (1.0)")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set reaching P (1.0)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling (0)")
    generate.add_argument("--stop", type=int, nargs="*", metavar="ID", help="stop tokens (default: the model's eos)")
    generate.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    generate.set_defaults(handler=_generate)
    return parser


def _add_source(parser: argparse.ArgumentParser, saved: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--example", metavar="NAME", help=f"an embedded example GPT: {', '.join(EXAMPLE_MODELS)}")
    source.add_argument("--checkpoint", metavar="FILE", help="a trained example GPT (.safetensors, as "
                                                             "examples/train_tiny_gpts.py writes)")
    source.add_argument("--hf", metavar="DIR", help="a local Hugging Face causal-LM directory (save_pretrained)")
    source.add_argument("--gguf", metavar="FILE", help="a GGUF file (needs the gguf extra); transformers dequantises "
                                                       "it to fp32, its tokenizer is read from the file")
    if saved:
        source.add_argument("--model", metavar="DIR", help="a converted model saved by moe-compile convert")


def _add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("MoEConfig", "unset fields take MoEConfig's defaults")
    for name, (kind, text) in CONFIG_FLAGS.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=text, default=argparse.SUPPRESS)
        else:
            group.add_argument(flag, type=kind, help=text, default=argparse.SUPPRESS)


def _add_calibration_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration", "text is tokenized by the --hf directory's tokenizer, or as bytes")
    group.add_argument("--calibration-text", nargs="+", metavar="FILE",
                       help="text files the calibration windows are drawn from (default: the standard library's "
                            "training split)")
    group.add_argument("--calibration-windows", type=int, default=64, help="calibration windows (64)")
    group.add_argument("--length", type=int, help="tokens per window (default: the model's context, at most 128)")


def _add_run_flags(parser: argparse.ArgumentParser, shape: tuple[int, int], dtype_help: str) -> None:
    parser.add_argument("--dtype", choices=tuple(DTYPES), help=dtype_help)
    parser.add_argument("--batch", type=int, default=shape[0], help=f"batch of the random inputs ({shape[0]})")
    parser.add_argument("--seq", type=int, default=shape[1], help=f"sequence length of the random inputs ({shape[1]})")


def _config(args: argparse.Namespace) -> MoEConfig:
    return MoEConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS if hasattr(args, name)})


def _dense_model(args: argparse.Namespace) -> nn.Module:
    """The dense model named by --example, --checkpoint or --hf."""
    if args.example is not None:
        return build_example(args.example)
    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint)
    from transformers import AutoModelForCausalLM

    if args.gguf is not None:
        path = _gguf_path(args.gguf)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     torch_dtype=torch.float32).eval()
        model.config._name_or_path = str(path.parent)  # save copies the tokenizer files found beside it
        return model
    if not Path(args.hf).is_dir():
        raise UsageError(f"--hf {args.hf}: no such directory. Pass a directory written by save_pretrained.")
    return AutoModelForCausalLM.from_pretrained(args.hf, local_files_only=True).eval()


def _gguf_path(name: str) -> Path:
    path = Path(name)
    if not path.is_file() or path.suffix != ".gguf":
        raise UsageError(f"--gguf {name}: no such .gguf file.")
    try:
        import gguf  # noqa: F401  (transformers reads the file with it)
    except ImportError:
        raise UsageError("--gguf needs the gguf package: pip install 'moe-compile[gguf]'.") from None
    return path


def _inspect(args: argparse.Namespace) -> int:
    if getattr(args, "model", None) is not None:
        given = [name for name in CONFIG_FLAGS if hasattr(args, name)]
        if given:
            raise UsageError(f"--model takes no MoEConfig flags (got --{given[0].replace('_', '-')}): a saved model "
                             "keeps the config it was converted with. Drop the flags, or inspect --example/--hf.")
        model = load(args.model)
        stats, sites = model_stats(model), model.moe_report
    else:
        model = _dense_model(args)
        inputs = _token_ids(model, *EXPORT_SHAPE)
        stats, sites = model_stats(model, _config(args), inputs), find_ffn_blocks(model, inputs)
    print(sites.table())
    print()
    print(stats.table())
    return 0


def _convert(args: argparse.Namespace) -> int:
    if args.format == "hf":
        if args.calibrate or args.calibration_text is not None:
            raise UsageError("--format hf converts one layer at a time, without running the model, so it cannot "
                             "calibrate. Drop --calibrate, or convert with --format moe_compile.")
        if args.expert_bits is not None:
            raise UsageError("--expert-bits rounds the experts of a moe_compile model for its ONNX export; an hf "
                             "checkpoint keeps float weights. Drop --expert-bits, or use --format moe_compile.")
        if args.hf is None:
            raise UsageError("--format hf converts a local LLaMA, Mistral or Qwen2 checkpoint: pass --hf DIR "
                             "(the embedded examples have no Hugging Face MoE equivalent).")
        print(convert_hf_checkpoint(args.hf, args.out, _config(args)))
        return 0
    dense = _dense_model(args)
    calibrate = args.calibrate or args.calibration_text is not None
    calibration = _Text.for_model(args, dense).calibration_batches(args) if calibrate else None
    model = convert(dense, _config(args), example_inputs=_token_ids(dense, *EXPORT_SHAPE),
                    calibration_data=calibration)
    if args.expert_bits is not None:
        quantize_experts(model, bits=args.expert_bits, block_size=args.block_size)
    print(model.moe_report.table())
    print()
    print(model_stats(model).table())
    save(model, args.out)
    print(f"\nsaved to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.no_calibration and args.calibration_text is not None:
        raise UsageError("--no-calibration and --calibration-text contradict each other; drop one.")
    if args.windows < 1:
        raise UsageError(f"--windows must be positive, got {args.windows}.")
    if hasattr(args, "top_k"):
        raise UsageError("eval sets top_k from each --active fraction (top_k = F * num_experts); drop --top-k.")
    dense = _dense_model(args)
    text = _Text.for_model(args, dense)
    validation = text.tokens(args.text, "validation")
    calibration = None if args.no_calibration else text.calibration_batches(args)
    fields = {"experts": "split", **{name: getattr(args, name) for name in CONFIG_FLAGS if hasattr(args, name)}}
    dense_perplexity, dense_predictions = score(dense, validation, length=text.length, max_windows=args.windows,
                                                bos=text.bos)
    rows = []
    for fraction in args.active:
        rows.append(evaluate_split(dense, fields, fraction, validation, calibration, text.length, args.windows,
                                   bos=text.bos, dense_predictions=dense_predictions))
        print(f"{fraction:.1%} active: perplexity {rows[-1]['perplexity']:.3f}", file=sys.stderr, flush=True)
    print(evaluation_table(dense_perplexity, rows))
    if args.json is not None:
        Path(args.json).write_text(json.dumps({"dense_perplexity": dense_perplexity, "window_length": text.length,
                                               "windows": args.windows, "rows": rows}, indent=1) + "\n")
    return 0


@dataclass
class _Text:
    """How text becomes a model's token ids: its --hf / --gguf tokenizer, or bytes (tokenizer None); windows of
    `length`, each led by the BOS token when the tokenizer puts one before every text it encodes (Gemma, LLaMA)."""

    tokenizer: Any
    length: int
    bos: Optional[int] = None

    @classmethod
    def for_model(cls, args: argparse.Namespace, model: nn.Module) -> "_Text":
        config = getattr(model, "config", None)
        context = next((getattr(config, name) for name in ("block_size", "n_positions", "max_position_embeddings")
                        if isinstance(getattr(config, name, None), int)), 128)
        length = args.length if args.length is not None else min(context, 128)
        if not 1 <= length <= context:
            raise UsageError(f"--length {length}: windows must be 1 to {context} tokens, the model's context.")
        if args.hf is not None or args.gguf is not None:
            from transformers import AutoTokenizer

            try:
                if args.gguf is not None:
                    path = _gguf_path(args.gguf)
                    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
                else:
                    tokenizer = AutoTokenizer.from_pretrained(args.hf, local_files_only=True)
            except (OSError, ValueError) as error:
                source = f"--gguf {args.gguf}" if args.gguf is not None else f"--hf {args.hf}"
                raise UsageError(f"{source}: no tokenizer to read the text with ({error}). Save one beside it with "
                                 "tokenizer.save_pretrained(DIR).") from None
            bos = tokenizer.bos_token_id
            leads = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
            return cls(tokenizer, length, bos if leads else None)
        vocab = getattr(config, "vocab_size", 0)
        if vocab < 256:
            raise UsageError(f"the model's vocabulary has {vocab} tokens, too few for byte-level text (256). Use a "
                             "byte-level GPT (--checkpoint) or an --hf directory with its tokenizer.")
        return cls(None, length)

    def tokens(self, files: Optional[list[str]], split: str) -> torch.Tensor:
        """Token ids [n] of the text files joined, or of the standard library's `split`."""
        return token_ids(self._read(files, split), self.tokenizer)

    def paragraphs(self, files: Optional[list[str]], split: str) -> list[list[int]]:
        """The token ids of every paragraph of `tokens`' text, each with the tokenizer's special tokens, cut to
        `length`."""
        texts = [part.strip() for part in self._read(files, split).split(b"\n\n") if part.strip()]
        if self.tokenizer is None:
            return [list(text[:self.length]) for text in texts]
        return self.tokenizer([text.decode("utf-8", errors="replace") for text in texts], truncation=True,
                              max_length=self.length)["input_ids"]

    @staticmethod
    def _read(files: Optional[list[str]], split: str) -> bytes:
        for name in files or ():
            if not Path(name).is_file():
                raise UsageError(f"{name}: no such text file.")
        return b"\n".join(Path(name).read_bytes() for name in files) if files else stdlib_text(split)

    def calibration_batches(self, args: argparse.Namespace) -> list[torch.Tensor]:
        """--calibration-windows windows of the --calibration-text (default: the standard library's training split)."""
        if args.calibration_windows < 1:
            raise UsageError(f"--calibration-windows must be positive, got {args.calibration_windows}.")
        return calibration_batches(self.length, args.calibration_windows,
                                   data=self.tokens(args.calibration_text, "train"), bos=self.bos)


def _optimize(args: argparse.Namespace) -> int:
    if args.windows < 1:
        raise UsageError(f"--windows must be positive, got {args.windows}.")
    dense = _dense_model(args)
    text = _Text.for_model(args, dense)
    fields = {name: getattr(args, name) for name in CONFIG_FLAGS if hasattr(args, name) and name != "top_k"}
    experts = fields.pop("num_experts", MoEConfig.num_experts)
    if args.candidates and "num_experts" in vars(args):
        raise UsageError("--candidates name each candidate's expert count (k/E); drop --num-experts.")
    splits = args.candidates or [(k, experts) for k in args.top_k]
    candidates = [MoEConfig(**fields, experts="split", num_experts=e, top_k=k) for k, e in splits]
    model, report = optimize(dense, text.calibration_batches(args), text.tokens(args.text, "validation"),
                             budget=args.budget, quality=args.quality, candidates=candidates, length=text.length,
                             windows=args.windows, bos=text.bos, example_inputs=_token_ids(dense, *EXPORT_SHAPE),
                             cost=args.cost, target=args.target, threads=args.threads,
                             latency_tokens=args.latency_tokens)
    print(report.table())
    save(model, args.out)
    print(f"\nsaved to {args.out}")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    if args.plot is not None:
        report.plot(args.plot)
    return 0


def _heal(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.batch_size < 1 or args.eval_windows < 1:
        raise UsageError("--tokens, --batch-size and --eval-windows must be positive.")
    model = load(args.model_dir)
    teacher = _dense_model(args)
    text = _Text.for_model(args, teacher)
    data = text.paragraphs(args.text, "train") if args.paragraphs else text.tokens(args.text, "train")
    report = heal(model, teacher, data, tokens=args.tokens, length=text.length,
                  batch_size=args.batch_size, loss=args.loss, positions=args.positions, lr=args.lr, train=args.train,
                  bos=None if args.paragraphs else text.bos,
                  eval_data=text.tokens(args.eval_text, "validation"), eval_every=args.eval_every,
                  eval_windows=args.eval_windows, checkpoint_dir=args.checkpoint_dir, seed=args.seed)
    print(report.table())
    save(model, args.out)
    print(f"\nsaved to {args.out}")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export

    if args.engine is not None and args.target != "tensorrt":
        raise UsageError(f"--engine builds a TensorRT engine from a tensorrt-target ONNX file; use --target tensorrt "
                         f"(got --target {args.target}).")
    if args.engine is not None and args.task != "forward":
        raise UsageError("--engine builds an engine of the forward graph; drop --engine for --task text-generation.")
    model = _saved_model(args.model_dir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    example = None if args.task == "text-generation" else _token_ids(model, args.batch, args.seq)
    report = export(model, example, args.out, task=args.task, target=args.target, dtype=DTYPES.get(args.dtype),
                    window_cache=args.window_cache, logits=args.logits)
    print(report.table())
    if args.engine is not None:
        from .export.tensorrt import build_engine

        build_engine(args.out, args.engine, opt_shape=(args.batch, args.seq), max_shape=(args.max_batch, args.max_seq))
        print(f"\nTensorRT engine: {args.engine}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .export import check_generation, check_parity

    if not Path(args.onnx_path).exists():
        raise UsageError(f"{args.onnx_path}: no such file. Write it first with moe-compile export.")
    model = _saved_model(args.model_dir)
    inputs = _token_ids(model, args.batch, args.seq)
    if Path(args.onnx_path).is_dir():
        if args.steps < 1:
            raise UsageError(f"--steps must be positive, got {args.steps}.")
        report = check_generation(model, args.onnx_path, inputs, steps=args.steps)
    else:
        report = check_parity(model, args.onnx_path, inputs, dtype=DTYPES.get(args.dtype))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0 if report.passed else 1


def _generate(args: argparse.Namespace) -> int:
    from .export import Generator

    generator = Generator(args.directory, threads=args.threads)
    if args.prompt is not None:
        prompts = args.prompt
    else:
        try:
            prompts = [[int(token) for token in ids.split()] for ids in args.ids]
        except ValueError:
            raise UsageError(f"--ids takes token ids separated by spaces, e.g. --ids \"464 3290 318\"; got "
                             f"{args.ids}.") from None
    streamed = []

    def stream(tokens: list[int]) -> None:  # one prompt: print its text as it comes
        if len(tokens) == 1 and generator.tokenizer is not None:
            streamed.append(tokens[0])
            sys.stdout.write(generator.tokenizer.decode(streamed)[len(generator.tokenizer.decode(streamed[:-1])):])
            sys.stdout.flush()

    result = generator.generate(prompts, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_tokens=args.stop,
                                on_token=stream)
    if streamed:
        print()
    else:
        for tokens, text in zip(result.tokens, result.text or [None] * len(result.tokens)):
            print(text if text is not None else " ".join(map(str, tokens)))
    print(result.summary(), file=sys.stderr)
    return 0


def _saved_model(directory: str) -> nn.Module:
    """A model saved by moe-compile convert, or the dense model of a Hugging Face directory."""
    path = Path(directory)
    if path.is_dir() and not (path / RECIPE_FILE).is_file() and (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return load(directory)


def _token_ids(model: nn.Module, batch: int, seq: int) -> tuple[torch.Tensor]:
    """Seeded random token ids [batch, seq] (int64) from the model's vocabulary, as a 1-tuple of inputs."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise UsageError(f"{type(model).__name__} has no config.vocab_size to draw token ids from. Use the Python "
                         "API (moe_compile.export / check_parity) with your own inputs.")
    if batch < 1 or seq < 1:
        raise UsageError(f"--batch and --seq must be positive, got {batch} and {seq}.")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    ids[:, seq // 2:] = ids[:, :seq - seq // 2].clone()  # real text repeats tokens: equal ids must route alike
    return (ids,)
