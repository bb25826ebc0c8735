"""Coverage: which transformers architectures convert exactly, with no per-model code.

Every architecture in transformers' causal-LM, masked-LM and seq2seq auto-mappings is built from a tiny config,
derived from its default config by `shrink` (the same rules for every family, through the config's own attribute
names and values: its layer count, width, head count and FFN width wherever they appear), with random weights.
It is converted twice with no example inputs (upcycled experts, renormalised top-2 of 4; split experts, k = E = 4)
and run against the dense model on the model's own dummy inputs, every output compared (an audio decoder of several
codebooks, Musicgen, gets its ids tiled to a row per codebook, a model that adds audio to every token, VoxtralRealtime,
audio features along its ids, and those as example inputs). Each is marked

    converted   both conversions exact on every output: max |moe - dense| <= 1e-5 * max(1, max |dense|)
                (absolute up to magnitude 1, relative to the output's scale beyond: fp32 rounding grows with it)
    skipped     FFN sites found, but not all converted exactly (the reason); candidates whose shapes are no FFN's
                (d -> d' with d' != d: a multimodal projector, an LM head) are passed over, as the matcher does
    not found   no FFN site found (the search's notes)
    no FFN      nothing found, and a pure state-space model (STATE_SPACE: Mamba's blocks are one gated SSM mixer
                each, with no feed-forward), counted apart; weight shapes cannot tell (Mamba's in_proj [2f, d] and
                out_proj [d, f] are a fused gated FFN's), so the list is explicit and hybrids (Zamba) stay counted
    not built   the tiny config does not build or run (a harness gap: counted in the denominator)
    MoE model   an MoE model already, not a dense-FFN model (counted apart)

Architectures run in worker processes of CHUNK each, every one with a time limit. Writes
benchmarks/results/hf_coverage.{json,md}.

    nice -n 10 python benchmarks/hf_coverage.py [--only TYPE ...] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MAPPINGS = {"causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
            "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"}
TINY = dict(layers=2, width=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=96)  # vocab != width (below)
TOLERANCE = 1e-5
STATE_SPACE = {"mamba", "falcon_mamba", "mamba2"}  # model types with no FFN in any block
NOT_AN_FFN = "shapes do not form an FFN"  # a projector or LM head (d_in != d_out) the matcher rightly passes over
HEAD_DIM = r"head_?dim|d_head|d_kv|kv_channels|rotary_dim|rope_dim"
CHUNK = 20


def architectures() -> list[tuple[str, str, str]]:
    """(mapping, model type, model class name) of every entry of the three auto-mappings."""
    from transformers.models.auto import modeling_auto

    found = []
    for mapping, attribute in MAPPINGS.items():
        for model_type, class_name in getattr(modeling_auto, attribute).items():
            for name in ([class_name] if isinstance(class_name, str) else class_name):
                found.append((mapping, model_type, name))
    return found


def kept_layers(values: dict, layers: int) -> list[int]:
    """The layers a tiny config keeps: the first of each type its layer-type list names (NeoMME's global layers, after
    sliding ones; Zamba2's hybrid ones), then the first others, TINY["layers"] in all. Where a period places a type
    (Zamba's attn_layer_period), its rarest type keeps a second layer too: a block its layers share stays shared."""
    types = next((value for name, value in values.items() if "layer" in name and isinstance(value, list)
                  and len(value) == layers and all(isinstance(kind, str) for kind in value)), [])
    first = [types.index(kind) for kind in dict.fromkeys(types)]
    kept = sorted((first + [i for i in range(layers) if i not in first])[:TINY["layers"]])
    if len(first) > 1 and any(name.endswith("layer_period") and type(value) is int for name, value in values.items()):
        rarest = min(dict.fromkeys(types), key=types.count)
        kept = sorted(kept + [i for i, kind in enumerate(types) if kind == rarest and i not in kept][:1])
    return kept


def sibling_width(config, siblings: list) -> int:
    """The tiny width of a sub-config whose width a sibling names as m x its own (BLT's local encoder and decoder name
    the global transformer's: hidden_size_global = cross_attn_k x hidden_size): m x the tiny width; TINY's else."""
    width = getattr(config, "hidden_size", None)
    for other in siblings:
        own = getattr(other, "hidden_size", None)
        if other is not config and width and own and width % own == 0 and any(
                name.startswith("hidden_size_") and value == width for name, value in vars(other).items()):
            return width // own * TINY["width"]
    return TINY["width"]


def shrink(config, tiny: int = TINY["width"]):
    """The config with its sizes made tiny, found by the config's own attribute names and default values; its width
    becomes `tiny`."""
    from transformers import PreTrainedConfig

    values = config.to_dict()
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    keep = kept_layers(values, layers) if layers else []
    changes = {}
    for name, value in values.items():
        if value is None and width and heads:  # unset sizes some models read without a default of their own
            if name == "head_dim":
                changes[name] = TINY["head_dim"]
            elif re.search(r"key_value_heads|kv_heads", name):
                changes[name] = TINY["kv_heads"]
            elif name == "vocab_size":  # ESM: set by its tokenizer
                changes[name] = TINY["vocab"]
            elif name == "pad_token_id" and getattr(config, "vocab_size", None) is None:  # ESM masks its padding
                changes[name] = 0
            elif name == "default_language" and values.get("languages"):  # X-MOD's adapters need a language
                changes[name] = values["languages"][0]
        if name == "vocab_size" and value == tiny:  # ESM-C's 64: an LM head d -> vocab would look like a square FFN
            changes[name] = TINY["vocab"]
        if name == "rope_parameters" and value == {} and values.get("layer_types"):  # Cohere Compass sets none
            changes[name] = {kind: {"rope_type": "default", "rope_theta": 10000.0} for kind in values["layer_types"]}
        if isinstance(value, bool) or not isinstance(value, (int, list)):
            continue
        words = set(re.split(r"_", name))
        if isinstance(value, list):
            if layers and len(value) == layers and "layer" in name:  # per-layer lists (layer types, ...)
                changes[name] = [value[i] for i in keep]
            elif re.search(r"layer_?(ids|indices|idx)", name) and all(type(i) is int for i in value):
                changes[name] = [keep.index(i) for i in value if i in keep]  # Zamba2's hybrid_layer_ids
            elif width and all(type(v) is int for v in value) and sum(value) == width:  # parts of the width
                changes[name] = [v * tiny // width for v in value]  # (Reformer's axial position dims)
        elif name.endswith("shared_layers"):  # the last n layers reuse others' KV (Gemma3n): none in two layers
            changes[name] = 0
        elif "layer" in name or "layers" in words or name in ("n_layer", "depth"):
            if layers and value == layers or re.search(r"(num|n)_(hidden_)?(encoder_|decoder_)?layers?$", name) \
                    or re.search(r"^(encoder|decoder)_layers$", name):
                changes[name] = len(keep) if value == layers else min(value, TINY["layers"])
        elif re.search(r"key_value|kv_heads|num_kv|query_groups", name):  # grouped unless as many as the heads
            changes[name] = TINY["heads"] if value == heads else TINY["kv_heads"]
        elif re.search(HEAD_DIM, name):
            changes[name] = TINY["head_dim"] // (2 if "rot" in name or "rope" in name else 1)
        elif "size" not in name and ("head" in name and "dim" not in name and heads and value == heads
                                     or re.search(r"_heads?$", name)):  # a head count, not chunk_size_lm_head
            changes[name] = TINY["heads"]
        elif width and value == width:
            changes[name] = tiny
        elif width and value > width and re.search(r"intermediate|ffn|d_ff|inner|mlp|hidden_dim|filter", name):
            changes[name] = TINY["ffn"]
        elif width and tiny < value and value * tiny % width == 0 and (
                re.search(r"(embedding|bottleneck|hidden)_size$", name)  # MobileBERT's bottleneck, Zamba2's attention
                or name.startswith("hidden_size_") and value % width == 0):  # BLT's hidden_size_global
            changes[name] = value * tiny // width  # a stream m x the width stays so
    head_dims = [name for name in changes if re.search(HEAD_DIM, name)]
    for name in head_dims:  # head dims equal by default stay equal (MLA: head_dim is the rope part), a rope one rules
        rope = [other for other in head_dims if values[other] == values[name] and re.search(r"rot|rope", other)]
        if rope:
            changes[name] = changes[rope[0]]
    sized = [name for name in head_dims if isinstance(values[name], int)]  # unset ones (None) take part in neither
    for name in sized:  # one that is the sum of two others by default (MLA: qk_head_dim = nope + rope) stays so
        parts = [(a, b) for a in sized for b in sized if a < b and values[a] + values[b] == values[name]]
        if parts:
            changes[name] = changes[parts[0][0]] + changes[parts[0][1]]
    heads_set = [name for name in changes if re.search(r"_heads?$", name) and name not in head_dims
                 and isinstance(values[name], int)]
    for name in heads_set:  # heads x head size = m x width by default (a Mamba2 mixer's expand x width) stays so
        for size in sized:
            product = values[name] * values[size]
            if width and product % width == 0 and (product // width * tiny) % changes[size] == 0:
                changes[name] = product // width * tiny // changes[size]
                break
    for name in heads_set:  # a size of the same family that is heads x head size stays so (Falcon-H1's mamba_d_ssm)
        family = name.split("_")[0] + "_"
        for size in [size for size in sized if size.startswith(family)]:
            for other, value in values.items():
                if other.startswith(family) and re.search(r"_d_|dim|size", other) and other not in changes \
                        and value == values[name] * values[size]:
                    changes[other] = changes[name] * changes[size]
    for name, value in changes.items():
        setattr(config, name, value)
    subs = [value for value in vars(config).values() if isinstance(value, PreTrainedConfig) and value is not config]
    for sub, sub_tiny in [(sub, sibling_width(sub, subs)) for sub in subs]:  # composite models (text_config, ...)
        shrink(sub, sub_tiny)
    return config


def own_config(model_class, config):
    """The config `model_class` is built from: `config` itself, or its sub-config of the class's config class (a text
    decoder registered under a composite model type: Qwen3.5, Emu3, Musicgen)."""
    from transformers import PreTrainedConfig

    wanted = getattr(model_class, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    return next((value for value in vars(config).values()
                 if isinstance(value, PreTrainedConfig) and isinstance(value, wanted)), config)


def is_moe_config(config) -> bool:
    """The config (or a sub-config) sets a number of experts (num_experts, n_routed_experts, num_local_experts,
    moe_num_experts, ...) and no is_moe / use_moe flag turns them off (Doge: dense unless is_moe)."""
    from transformers import PreTrainedConfig

    if any(re.search(r"^(is|use)_moe$", name) and value is False for name, value in vars(config).items()):
        return False
    for name, value in vars(config).items():
        if isinstance(value, PreTrainedConfig) and value is not config and is_moe_config(value):
            return True
        if re.search(r"^(moe_)?(num|n)_(routed_|local_)?experts$", name) and isinstance(value, int) and value > 1:
            return True
    return False


def per_token_audio(config, ids):
    """Audio features for a model that adds audio to every token it reads (a config that sets an audio length per
    token: a streaming speech model's, which refuses ids alone): random [batch, mel bins, tokens x that length];
    None for other configs."""
    import torch
    from transformers import PreTrainedConfig

    per_token = next((value for name, value in vars(config).items()
                      if re.search(r"audio\w*_per_tok", name) and type(value) is int), None)
    configs = [config, *(value for value in vars(config).values() if isinstance(value, PreTrainedConfig))]
    bins = next((c.num_mel_bins for c in configs if type(getattr(c, "num_mel_bins", None)) is int), None)
    if per_token is None or bins is None or ids is None:
        return None
    return torch.randn(ids.shape[0], bins, ids.shape[1] * per_token)


def run_one(mapping: str, model_type: str, class_name: str) -> dict:
    """Build, convert twice, compare; the result row of one architecture."""
    import torch
    import transformers

    import moe_compile as mc
    from moe_compile.errors import first_line
    from moe_compile.model_io import ModelCall, default_inputs

    row = {"mapping": mapping, "model_type": model_type, "class": class_name}
    try:
        config = transformers.AutoConfig.for_model(model_type)
        if is_moe_config(config):  # before shrinking: Dots3's per-layer expert counts leave it no global head count
            return {**row, "status": "MoE model", "reason": "an MoE model already (its config has experts)"}
        config = shrink(config)
        config = own_config(getattr(transformers, class_name), config)
        if mapping == "causal-lm" and getattr(config, "is_decoder", None) is False:  # as AutoModelForCausalLM wants
            config.is_decoder = True
        torch.manual_seed(0)
        dense = getattr(transformers, class_name)(config).eval()
        inputs = default_inputs(dense)
        if inputs is None:
            raise TypeError("the model has no dummy_inputs")
        example = None  # convert finds the model's own dummy inputs, unless they had to change
        if getattr(config, "num_codebooks", None) and "input_ids" in inputs.kwargs:  # Musicgen's decoder reads
            inputs.kwargs["input_ids"] = inputs.kwargs["input_ids"].repeat(config.num_codebooks, 1)  # a row a codebook
            example = inputs
        audio = per_token_audio(config, inputs.kwargs.get("input_ids"))
        if audio is not None and "input_features" in inspect.signature(dense.forward).parameters:
            inputs.kwargs["input_features"] = audio  # VoxtralRealtime: an audio frame sequence along its tokens
            example = inputs
        reference = ModelCall(dense).named(inputs)
    except Exception as error:  # noqa: BLE001 - any failure to build or run is the row's reason
        if any(re.search(r"moe|expert", type(frame.f_locals.get("self")).__name__, re.I)
               for frame, _ in traceback.walk_tb(error.__traceback__)):  # Dots1: the config leaves the count unset
            return {**row, "status": "MoE model", "reason": "an MoE model already (it failed building its experts)"}
        return {**row, "status": "not built", "reason": first_line(error, 200)}
    if any(re.search(r"moe|expert", type(m).__name__, re.I) for m in dense.modules()):
        return {**row, "status": "MoE model", "reason": "an MoE model already (not a dense FFN)"}
    row["params"] = sum(p.numel() for p in dense.parameters())
    configs = {"upcycle top-2": mc.MoEConfig(num_experts=4, top_k=2),
               "split k=E": mc.MoEConfig(num_experts=4, top_k=4, experts="split")}
    errors = {}
    for label, moe_config in configs.items():
        try:
            moe = mc.convert(dense, moe_config, example_inputs=example)
        except mc.NoFFNFoundError:
            report = mc.find_ffn_blocks(dense, example)
            found = [s for s in report.sites]
            if found:
                reasons = sorted({s.reason for s in found if s.action == "skipped"})
                return {**row, "status": "skipped", "sites": len(found), "reason": "; ".join(reasons)[:300]}
            if model_type in STATE_SPACE:
                return {**row, "status": "no FFN", "reason": "a state-space model: each block is one gated SSM mixer, "
                                                             "no feed-forward"}
            notes = "; ".join(sorted({n.outcome for n in report.notes if "torch.fx" not in n.outcome}))
            return {**row, "status": "not found", "reason": notes[:300] or "no FFN pattern in any module"}
        except Exception as error:  # noqa: BLE001
            before = "".join(f"{done} {'exact' if e <= TOLERANCE else 'not exact'} ({e:.0e}); "
                             for done, e in errors.items())  # BitNet: upcycle exact, split refused
            return {**row, "status": "skipped", "reason": f"{before}{label}: convert raised {first_line(error, 200)}"}
        report = moe.moe_report
        row["sites"] = len(report.converted)
        row["patterns"] = sorted({s.pattern for s in report.converted})
        skipped = [s for s in report.sites if s.action == "skipped" and not s.reason.startswith(NOT_AN_FFN)]
        got = ModelCall(moe).named(inputs)
        errors[label] = max((got[k] - reference[k]).abs().max().item() / max(1.0, reference[k].abs().max().item())
                            for k in reference if k in got)
        if skipped:
            return {**row, "status": "skipped", "reason": f"{len(skipped)} of {len(report.sites)} sites skipped: "
                                                          f"{skipped[0].reason}"[:300]}
    row["max_scaled_error"] = errors  # max |moe - dense| / max(1, max |dense|) over the outputs
    if all(e <= TOLERANCE for e in errors.values()):
        return {**row, "status": "converted"}
    return {**row, "status": "skipped",
            "reason": "not exact (scaled error): " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())}


def table(rows: list[dict]) -> str:
    """The README table: counts per status, then every architecture that did not convert, with its reason."""
    from moe_compile.table import format_table

    dense = [r for r in rows if r["status"] not in ("MoE model", "no FFN")]
    converted = [r for r in dense if r["status"] == "converted"]
    built = [r for r in dense if r["status"] not in ("not built", "not run")]
    lines = [f"{len(converted)} of {len(dense)} dense-FFN architectures convert exactly "
             f"({len(converted) / max(len(dense), 1):.0%}; {len(converted)} of the {len(built)} the harness builds, "
             f"{len(converted) / max(len(built), 1):.0%}), exact meaning max |moe - dense| <= {TOLERANCE:g} x "
             "max(1, max |dense|) on every output; MoE models and models with no dense FFN are counted apart.", ""]
    counts = [("status", "architectures")] + [(s, str(sum(r["status"] == s for r in rows))) for s in
                                               ("converted", "skipped", "not found", "not built", "not run",
                                                "MoE model", "no FFN")]
    lines += [format_table(counts), ""]
    rest = [("mapping", "class", "status", "reason")]
    rest += [(r["mapping"], r["class"], r["status"], r.get("reason", "")[:150])
             for r in rows if r["status"] != "converted"]
    lines += [format_table(rest), "", "converted: " + ", ".join(sorted({r["class"] for r in converted}))]
    return "\n".join(lines)


def run_chunk(specs: list[str], timeout: float) -> None:
    """Worker: one JSON line per 'mapping:model_type:class', each bounded by `timeout` seconds."""
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)

    def expire(signum, frame):
        raise TimeoutError(f"timed out after {timeout:.0f} s")

    signal.signal(signal.SIGALRM, expire)
    for spec in specs:
        mapping, model_type, class_name = spec.split(":")
        start = time.perf_counter()
        signal.alarm(int(timeout))
        try:
            row = run_one(mapping, model_type, class_name)
        except TimeoutError as error:
            row = {"mapping": mapping, "model_type": model_type, "class": class_name, "status": "skipped",
                   "reason": str(error)}
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="model types to run (default: every one)")
    parser.add_argument("--timeout", type=float, default=90, help="seconds per architecture (90)")
    parser.add_argument("--update", action="store_true",
                        help="rerun only the architectures the last results did not convert (those counted apart "
                             "aside)")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds for the whole sweep; architectures left when it is spent are listed as not run")
    parser.add_argument("--chunk", nargs="*", help=argparse.SUPPRESS)  # internal: a worker's architectures
    args = parser.parse_args()
    if args.chunk is not None:
        run_chunk(args.chunk, args.timeout)
        return 0
    todo = [f"{m}:{t}:{c}" for m, t, c in architectures() if not args.only or t in args.only]
    kept = []
    if args.update:
        kept = [r for r in json.loads((RESULTS / "hf_coverage.json").read_text())
                if r["status"] in ("converted", "MoE model", "no FFN")]
        done = {f"{r['mapping']}:{r['model_type']}:{r['class']}" for r in kept}
        todo = [spec for spec in todo if spec not in done]
    rows, start = [], time.perf_counter()
    while todo and time.perf_counter() - start < args.budget:
        specs, todo = todo[:CHUNK], todo[CHUNK:]
        worker = subprocess.run([sys.executable, __file__, "--timeout", str(args.timeout), "--chunk", *specs],
                                capture_output=True, text=True)
        done = [json.loads(line) for line in worker.stdout.splitlines() if line.startswith("{")]
        if len(done) < len(specs):  # the worker died in native code: record that one, rerun the rest
            mapping, model_type, class_name = specs[len(done)].split(":")
            crash = (worker.stderr.strip().splitlines() or ["no message"])[-1][:200]
            done.append({"mapping": mapping, "model_type": model_type, "class": class_name, "status": "not built",
                         "reason": f"the process died: {crash}"})
            todo = specs[len(done):] + todo
        rows += done
        for row in done:
            print(f"{row['status']:10s} {row['class']:45s} {row.get('reason', '')[:100]}", flush=True)
    rows += [dict(zip(("mapping", "model_type", "class"), spec.split(":")), status="not run",
                  reason="the sweep's time budget was spent") for spec in todo]
    order = {spec: i for i, spec in enumerate(f"{m}:{t}:{c}" for m, t, c in architectures())}
    rows = sorted(kept + rows, key=lambda r: order.get(f"{r['mapping']}:{r['model_type']}:{r['class']}", 0))
    RESULTS.mkdir(exist_ok=True)
    name = "hf_coverage" if not args.only else "hf_coverage_partial"
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
