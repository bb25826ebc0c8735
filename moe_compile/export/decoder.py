"""A causal LM as one ONNX decoder with a KV cache, in the layout optimum and onnxruntime-genai load.

    inputs:  input_ids [b, s], attention_mask [b, p + s] (when the model takes one), position_ids [b, s] (likewise),
             past_key_values.{i}.key | .value [b, h_kv, p, d]                  (p = 0 for the prefill)
    outputs: logits [b, s, vocab] ([b, 1, vocab] with logits="last"), present.{i}.key | .value [b, h_kv, p + s, d]
             present = concat(past, the new tokens' keys / values) along the sequence axis

One graph serves prefill (s = prompt length, p = 0) and every decode step (s = 1, p = tokens so far): b, s, p and
p + s are dynamic axes. Two kinds of model carry a cache: a transformers causal LM runs with a `DynamicCache` built
from the past tensors and returns the cache's tensors as `present`; a hand-written GPT takes a list of (keys,
values) per block with use_cache=True and returns (logits, that list with the new tokens appended), as
nanoGPT-style code does.

A sliding-window layer (window W: a query sees itself and the W - 1 keys before it) keeps all p keys by default,
its mask doing the windowing, because the clients size every layer's cache alike. With a window cache
(`export(..., window_cache=True)`) it keeps only what the next step can see:

    past_key_values.{i}.key [b, h_kv, w, d]   w = min(p, W - 1), the keys of positions p - w .. p - 1
    present.{i}.key = the last min(w + s, W - 1) positions of concat(past, new)

and its mask places key j at position p - w + j (the cache layer of `_window_layer_class` reports that offset, p
coming from attention_mask's length), so the cache of a Gemma 3 sliding layer stops growing at W - 1 positions.
A model that takes no attention mask cannot left-pad a batch: the generation runner refuses prompts of unequal
lengths for it.

Shared cache buffers (`share_cache_buffers`, target "ort"): where a layer's attention over the cache is one
GroupQueryAttention, its past inputs may also be buffers longer than p, each bound as the layer's present output
too: the op then writes the new tokens' keys and values into the buffer at p .. p + s - 1 in place, instead of
copying the whole past into a new present at every step (a windowed layer keeps separate buffers). The graph reads
p as attention_mask's length minus s (every Shape of a past input is rewritten so), which is the past's own length
when the past is exact, so one graph serves both ways (optimum and onnxruntime-genai pass exact pasts; our runner
preallocates prompt + max_new_tokens).

Only a routing that computes each token from that token alone generates: a capacity counts the tokens of the
call (a prompt and one decoded token see different capacities), and expert choice compares the tokens of a
sequence, so prefill and cached decode would route differently; such layers are refused (`generation_refusal`).
"""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx
import torch
import torch.nn as nn
from onnx import helper

from ..errors import MoECompileError, first_line
from ..moe import MoELayer, iter_moe_layers
from ..source_files import copy_source_files, source_dir
from .fusion import FUSED_DOMAIN, GQA_OP
from .ort_moe import may_drop

MODEL_FILE = "model.onnx"
METADATA_FILE = "moe_generation.json"  # what our runner reads: the cache layout and the stop tokens
# transformers model_type -> onnxruntime-genai model type (the decoder types its genai_config.json accepts)
GENAI_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                     "gemma2": "gemma2", "gemma3_text": "gemma3_text", "phi": "phi", "phi3": "phi3",
                     "granite": "granite", "olmo": "olmo", "nemotron": "nemotron"}


@dataclass
class CacheLayout:
    """The KV cache of one model: per layer, keys and values [b, heads, p, head_dim]."""

    num_layers: int
    heads: int
    head_dim: int
    position_ids: bool  # whether the model takes position_ids
    cache_argument: str  # the forward's name for the cache: "cache" (transformers >= 5.2x), "past_key_values", ...
    attention_mask: bool = True  # whether the model takes an attention mask
    tuples: bool = False  # the cache is a list of (keys, values) per block, not a transformers Cache
    vocab_size: int = 0
    sliding: tuple[bool, ...] = ()  # per layer: a sliding-window attention layer
    sliding_window: int = 0  # W of the sliding layers
    window_cache: bool = False  # the sliding layers keep only their last W - 1 keys and values (module docstring)
    last_logits: bool = False  # logits of the last position only: [b, 1, vocab]

    def windowed(self, layer: int) -> bool:
        return self.window_cache and self.sliding[layer]

    def input_names(self) -> list[str]:
        fixed = ["input_ids"] + ["attention_mask"] * self.attention_mask + ["position_ids"] * self.position_ids
        return fixed + [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]


class DecoderWithPast(nn.Module):
    """model(input_ids, [attention_mask], [position_ids], *past) -> (logits, *present), flat tensors only."""

    def __init__(self, model: nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids: torch.Tensor, *rest: torch.Tensor):
        layout = self.layout
        named = dict(zip(["attention_mask"] * layout.attention_mask + ["position_ids"] * layout.position_ids, rest))
        past = rest[len(named):]
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(layout.num_layers)]
        if layout.tuples:
            logits, present = self.model(input_ids, **named, **{layout.cache_argument: pairs}, use_cache=True)[:2]
            return (logits[:, -1:] if layout.last_logits else logits, *[t for pair in present for t in pair])
        from transformers import DynamicCache

        cache = DynamicCache(pairs)
        seen = named["attention_mask"].shape[1] - input_ids.shape[1] if layout.window_cache else 0
        for i, (keys, values) in enumerate(pairs):
            if layout.windowed(i):
                cache.layers[i] = _window_layer_class()(seen)
                cache.layers[i].update(keys, values)
        head = {"logits_to_keep": 1} if layout.last_logits else {}
        out = self.model(input_ids=input_ids, use_cache=True, **named, **head, **{layout.cache_argument: cache})
        window, layers = layout.sliding_window - 1, returned_cache(out).layers
        return (out.logits, *[t[:, :, -window:] if layout.windowed(i) else t
                              for i, layer in enumerate(layers) for t in (layer.keys, layer.values)])


@functools.cache
def _window_layer_class():  # transformers is imported only where a model needs it
    from transformers.cache_utils import DynamicLayer

    class WindowLayer(DynamicLayer):
        """A sliding layer's cache holding the keys of the last w positions before the call, of `seen` in all:
        its keys sit at positions seen - w ..., which the mask reads as the offset (transformers' own sliding layer
        decides by comparing lengths, which torch.export would fix to the example's case)."""

        is_sliding = True

        def __init__(self, seen):
            super().__init__()
            self.seen = seen

        def get_seq_length(self):
            return self.seen

        def get_mask_sizes(self, query_length):
            held = self.keys.shape[-2]
            return held + query_length, self.seen - held

    return WindowLayer


def generation_refusal(name: str, layer: MoELayer) -> Optional[str]:
    """Why `layer` would route a cached decode step differently from the prompt, or None when it cannot."""
    router = layer.router
    if router.routing == "expert_choice":
        return (f"layer {name!r} uses expert-choice routing: each expert picks among the tokens of a sequence, so a "
                "token's route depends on the others and one decoded token cannot be routed as in the prompt")
    if may_drop(router.capacity_factor, router.top_k, router.num_experts):
        return (f"layer {name!r} has capacity_factor={router.capacity_factor}: the capacity counts the tokens of each "
                "call, so a prompt and a single decoded token drop differently")
    return None


def cache_layout(model: nn.Module, window_cache: bool = False, last_logits: bool = False) -> CacheLayout:
    """The model's KV cache, read from one eager forward with use_cache=True on a 2 x 3 prompt; a clear error when
    the model has no cache that this export can carry (or no sliding-window layer to window, with window_cache)."""
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    cache_argument = next((n for n in ("cache", "past_key_values", "past") if n in params), None)
    if cache_argument is None or "use_cache" not in params:
        raise MoECompileError(
            f"export(task='text-generation'): {name} has no KV cache interface: a transformers causal LM (its forward "
            "takes a cache and use_cache), or a GPT whose forward takes `past` (a list of (keys, values) per block) "
            "and use_cache, and then returns (logits, that list). Export it with task='forward' (a prompt-only "
            "graph), or give the model such a cache.")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise MoECompileError(f"export(task='text-generation'): {name} is an encoder-decoder; this export writes "
                              "decoder-only LMs. Export it with task='forward'.")
    refusals = [reason for reason in (generation_refusal(n, layer) for n, layer in iter_moe_layers(model)) if reason]
    if refusals:
        raise MoECompileError(f"export(task='text-generation'): {refusals[0]}"
                              f"{f' (and {len(refusals) - 1} more layers)' if len(refusals) > 1 else ''}. Convert "
                              "with a dropless routing for generation: token_choice with capacity_factor=None, or "
                              "switch with capacity_factor >= num_experts.")
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, dtype=torch.long), use_cache=True)
    except MoECompileError:  # a captured block that cannot take the cache names itself
        raise
    except Exception as error:
        raise MoECompileError(f"export(task='text-generation'): {name} fails when called with use_cache=True: "
                              f"{first_line(error, 300)}.") from None
    cache, tuples = returned_cache(out), isinstance(out, (tuple, list))
    layers = getattr(cache, "layers", [])
    pairs = out[1] if tuples and len(out) >= 2 else [(layer.keys, layer.values) for layer in layers]
    logits = out[0] if tuples else getattr(out, "logits", None)
    if not pairs or not isinstance(logits, torch.Tensor) or any(
            len(pair) != 2 or not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in pair) for pair in pairs):
        raise MoECompileError(f"export(task='text-generation'): {name} returned {type(out).__name__}, not logits and "
                              "one key and one value tensor [batch, heads, seq, head_dim] per layer; this export "
                              "carries only such caches.")
    keys = pairs[0][0]
    sliding = tuple(bool(getattr(layer, "is_sliding", False)) for layer in layers)
    window = next((getattr(layer, "sliding_window", 0) for layer in layers if getattr(layer, "is_sliding", False)), 0)
    if last_logits and not tuples and "logits_to_keep" not in params:
        raise MoECompileError(f"export(logits='last'): {name}.forward takes no logits_to_keep, so its LM head "
                              "cannot be limited to the last position; export with logits='all'.")
    if window_cache and not (window > 1 and "attention_mask" in params):
        raise MoECompileError(f"export(window_cache=True): {name} has no sliding-window attention layer whose cache "
                              "could be windowed (its cache holds every layer's keys in full); drop window_cache.")
    return CacheLayout(num_layers=len(pairs), heads=keys.shape[1], head_dim=keys.shape[3],
                       position_ids="position_ids" in params, cache_argument=cache_argument,
                       attention_mask="attention_mask" in params, tuples=tuples, vocab_size=logits.shape[-1],
                       sliding=sliding, sliding_window=int(window), window_cache=window_cache,
                       last_logits=last_logits)


def returned_cache(output):
    """The cache a transformers model returns (field `cache`, or `past_key_values` before transformers 5.2x)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def example_call(layout: CacheLayout, batch: int = 2, new: int = 3, past: int = 5, window: int = 4):
    """(args, dynamic_shapes) of one decode call: all sizes distinct and above 1 (torch.export specialises 0 and 1
    and unifies equal sizes); a windowed layer's past has `window` positions."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(1, min(layout.vocab_size, 100)), (batch, new), generator=g)
    caches = [torch.randn(batch, layout.heads, window if layout.windowed(i // 2) else past, layout.head_dim,
                          generator=g) for i in range(2 * layout.num_layers)]
    Dim = torch.export.Dim
    b, s, p, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    w = Dim("past_window")
    rest, rest_shapes = [], []
    if layout.attention_mask:
        rest.append(torch.ones(batch, past + new, dtype=torch.long))
        rest_shapes.append({0: b, 1: total})
    if layout.position_ids:
        rest.append(torch.arange(past, past + new).expand(batch, new))
        rest_shapes.append({0: b, 1: s})
    rest += caches
    rest_shapes += [{0: b, 2: w if layout.windowed(i // 2) else p} for i in range(len(caches))]
    return (ids, *rest), ({0: b, 1: s}, tuple(rest_shapes))  # shapes follow forward's signature


def share_cache_buffers(model: onnx.ModelProto, layout: CacheLayout) -> list[str]:
    """Rewrite `model` in place so that past inputs may be buffers shared with their present outputs (module
    docstring); returns those past inputs. A past input qualifies when it feeds its layer's GroupQueryAttention, whose
    present output is that layer's present, and otherwise Shape nodes only (not a windowed layer, whose present is a
    slice); none do in a model without an attention mask (p is known only from the past's shape)."""
    if not layout.attention_mask:
        return []
    graph, shared, shapes = model.graph, [], []
    producers = {output: node for node in graph.node for output in node.output}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            users.setdefault(name, []).append(node)
    for past, present in zip(layout.input_names()[-2 * layout.num_layers:], layout.output_names()[1:]):
        attention = producers.get(present)
        slot = 1 if past.endswith(".key") else 2  # GroupQueryAttention: inputs 3, 4 are the past; outputs 1, 2
        readers = [node for node in users.get(past, []) if node is not attention]
        if (attention is not None and attention.op_type == GQA_OP and attention.domain == FUSED_DOMAIN
                and list(attention.output).index(present) == slot and attention.input[2 + slot] == past
                and all(node.op_type == "Shape" for node in readers)):
            shared.append(past)
            shapes += readers
    if not shared:
        return []
    past_length = "moe_compile.past_sequence_length"
    nodes = [helper.make_node("Shape", ["attention_mask"], [past_length + ".total"], start=1, end=2),
             helper.make_node("Shape", ["input_ids"], [past_length + ".new"], start=1, end=2),
             helper.make_node("Sub", [past_length + ".total", past_length + ".new"], [past_length])]
    for node in shapes:  # Shape(past, start, end) -> the same dims with p for axis 2
        attributes = {a.name: a.i for a in node.attribute}
        start, end = (min(max(i + 4 if i < 0 else i, 0), 4) for i in (attributes.get("start", 0),
                                                                       attributes.get("end", 4)))
        dims = []
        for axis in range(start, end):
            if axis == 2:
                dims.append(past_length)
                continue
            dims.append(f"{node.output[0]}.axis{axis}")
            nodes.append(helper.make_node("Shape", [node.input[0]], [dims[-1]], start=axis, end=axis + 1))
        node.CopyFrom(helper.make_node("Concat", dims, list(node.output), name=node.name, axis=0))
    for node in reversed(nodes):  # first: they read graph inputs only
        graph.node.insert(0, node)
    return shared


def write_client_files(model: nn.Module, layout: CacheLayout, directory: Path, dtype: torch.dtype,
                       shared_cache: list[str]) -> list[str]:
    """config.json, the source's tokenizer and generation files, genai_config.json (for model types that
    onnxruntime-genai knows) and our own metadata beside model.onnx; returns the files written. A model without a
    transformers config (a hand-written GPT) gets the metadata alone: the other clients need that config."""
    config = getattr(model, "config", None)
    written, eos, pad, model_type = [], [], None, type(model).__name__
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
        written = ["config.json"] + copy_source_files(source_dir(model), directory)
        generation = getattr(model, "generation_config", None)
        if generation is not None and "generation_config.json" not in written:
            generation.save_pretrained(directory)
            written.append("generation_config.json")
        eos = _token_list(getattr(generation, "eos_token_id", None) or config.eos_token_id)
        pad = getattr(generation, "pad_token_id", None)
        pad = pad if isinstance(pad, int) else (config.pad_token_id if isinstance(config.pad_token_id, int) else None)
        model_type = config.model_type
    metadata = {"format": 1, "model_file": MODEL_FILE, "model_type": model_type,
                "num_layers": layout.num_layers, "kv_heads": layout.heads, "head_dim": layout.head_dim,
                "attention_mask": layout.attention_mask, "position_ids": layout.position_ids,
                "dtype": str(dtype).removeprefix("torch."), "vocab_size": layout.vocab_size, "eos_token_id": eos,
                "pad_token_id": pad, "inputs": layout.input_names(), "outputs": layout.output_names(),
                "shared_cache": shared_cache, "window_cache": layout.window_cache,
                "logits": "last" if layout.last_logits else "all"}
    (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    written.append(METADATA_FILE)
    # genai sizes every layer's cache alike: a window cache is for our runner only
    genai_type = GENAI_MODEL_TYPES.get(model_type) if layout.attention_mask and not layout.window_cache else None
    if genai_type is not None:
        (directory / "genai_config.json").write_text(json.dumps(
            _genai_config(config, layout, genai_type, eos, pad, len(shared_cache) == 2 * layout.num_layers),
            indent=2) + "\n")
        written.append("genai_config.json")
    return written


def _genai_config(config, layout: CacheLayout, model_type: str, eos: list[int], pad: Optional[int],
                  share_buffer: bool) -> dict:
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask",
              "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if layout.position_ids:
        inputs["position_ids"] = "position_ids"
    return {"model": {
        "type": model_type, "bos_token_id": config.bos_token_id if isinstance(config.bos_token_id, int) else 0,
        "eos_token_id": eos if len(eos) != 1 else eos[0], "pad_token_id": pad if pad is not None else (eos or [0])[0],
        "vocab_size": config.vocab_size, "context_length": getattr(config, "max_position_embeddings", 2048),
        "decoder": {"filename": MODEL_FILE, "head_size": layout.head_dim, "hidden_size": config.hidden_size,
                    "num_attention_heads": config.num_attention_heads, "num_key_value_heads": layout.heads,
                    "num_hidden_layers": layout.num_layers, "session_options": {"log_id": "moe_compile"},
                    "inputs": inputs, "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                                  "present_value_names": "present.%d.value"}}},
        "search": {"max_length": getattr(config, "max_position_embeddings", 2048), "do_sample": False,
                   "num_beams": 1, "past_present_share_buffer": share_buffer}}


def _token_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
