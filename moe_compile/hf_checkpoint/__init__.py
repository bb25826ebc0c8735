"""Standard Hugging Face MoE checkpoints (MixtralForCausalLM, Qwen2MoeForCausalLM), for the engines that serve
and train MoE at scale (vLLM, SGLang, TensorRT-LLM, transformers-based trainers).

    save_hf(model, directory)                       a converted LLaMA / Mistral / Qwen2 model, from memory
    convert_hf_checkpoint(source, directory, config) a dense checkpoint on disk, streamed one layer at a time:
                                                     never more than one dense and one MoE layer in memory

Both write config.json, one safetensors shard per decoder layer (plus one for embeddings, norm and head) with
model.safetensors.index.json, and copy the source's tokenizer and generation-config files. For the same
MoEConfig they write the same tensors: the streamed path builds each layer with the same expert builder and
router initialisation as `convert`, seeded `config.seed + layer index` as convert seeds its sites. What the
architectures compute, and what they cannot express, is in architectures.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import source_files
from ..config import MoEConfig
from ..errors import HFCheckpointError
from ..moe import DenseFFN, build_moe_layer, identify_activation, iter_moe_layers
from .architectures import (
    ARCHITECTURES,
    FFN_NAMES,
    OWN_FORMAT,
    MoEShape,
    Routing,
    check_routing,
    choose_architecture,
    layer_tensors,
    shared_expert,
    target_config,
)
from .shards import SourceCheckpoint, write_shards

PathLike = Union[str, Path]
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class HFCheckpoint:
    """What was written."""

    directory: Path
    architecture: str  # "MixtralForCausalLM" or "Qwen2MoeForCausalLM"
    layers: int
    num_experts: int
    top_k: int
    shards: int
    total_bytes: int
    copied: list[str]  # tokenizer / generation-config files copied from the source

    def __str__(self) -> str:
        return (f"{self.architecture}: {self.layers} MoE layers x {self.num_experts} experts (top-{self.top_k}), "
                f"{self.shards} shards, {self.total_bytes / 2**20:,.1f} MiB, "
                f"{len(self.copied)} tokenizer/generation files copied -> {self.directory}")


def save_hf(model: nn.Module, directory: PathLike, *, architecture: Optional[str] = None,
            tokenizer_dir: Optional[PathLike] = None) -> HFCheckpoint:
    """Write a converted LLaMA, Mistral or Qwen2 model as a Mixtral or Qwen2-MoE checkpoint.

    architecture: "mixtral" or "qwen2_moe"; default Mixtral for LLaMA/Mistral (Qwen2-MoE when the layers have
    a shared expert, or some were kept dense: its mlp_only_layers), Qwen2-MoE for Qwen2. tokenizer_dir: where to
    copy tokenizer files from (default: the directory the dense model was loaded from, when it is one). Raises
    HFCheckpointError naming what the architecture cannot express.
    """
    where = "save_hf"
    config = getattr(model, "config", None)
    layers = dict(iter_moe_layers(model))
    if not layers or not hasattr(config, "to_dict"):
        raise HFCheckpointError(f"{where}: {type(model).__name__} is not a converted transformers model. Convert a "
                                "LLaMA, Mistral or Qwen2 model with moe_compile.convert(model, MoEConfig(...)) first.")
    source = config.to_dict()
    report = getattr(model, "moe_report", None)
    kept = {s.name for s in report.sites if s.action == "kept dense"} if report is not None else set()
    dense_layers = sorted(int(m.group(1)) for name in kept if (m := _LAYER_KEY.match(name)) and name == m[0] + "mlp")
    target = choose_architecture(source, any(shared_expert(layer) for layer in layers.values()), architecture,
                                 where, dense_layers)
    count = source["num_hidden_layers"]
    expected = [f"model.layers.{i}.mlp" for i in range(count)]
    if sorted(layers) != sorted(name for name in expected if name not in kept):
        raise HFCheckpointError(f"{where}: {ARCHITECTURES[target]} has an MoE block as each decoder layer's MLP "
                                f"({', '.join(expected[:2])}, ...) unless it stays dense; this model's MoE layers "
                                f"are {', '.join(sorted(layers))}. Convert the whole model. {OWN_FORMAT}")
    moe = _common_shape([MoEShape.of_layer(layer) for layer in layers.values()], where)
    check_routing(moe.routing, target, where)

    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the head is the embedding; transformers re-ties it on load
    dense = {name: t for name, t in state.items() if not any(name.startswith(p + ".") for p in layers)}
    by_layer = _group_by_layer(dense, count, where)
    groups = [lambda: by_layer[None]] + [
        (lambda i=i: by_layer[i] if i in dense_layers else
         {**by_layer[i], **layer_tensors(layers[expected[i]], i, target, f"{where}: {expected[i]}")})
        for i in range(count)]
    lb_coef = (report.config if report is not None and report.config else MoEConfig()).load_balance_coef
    source_dir = tokenizer_dir if tokenizer_dir is not None else source_files.source_dir(model)
    dtype = next(iter(layers.values())).up_weight.dtype
    return _write(directory, groups, lambda: (moe, dtype), source, target, lb_coef, source_dir, dense_layers)


def convert_hf_checkpoint(source_dir: PathLike, directory: PathLike, config: Optional[MoEConfig] = None, *,
                          architecture: Optional[str] = None, progress: Optional[bool] = None) -> HFCheckpoint:
    """Convert the dense LLaMA / Mistral / Qwen2 checkpoint in `source_dir` into a Mixtral / Qwen2-MoE checkpoint
    in `directory`, one decoder layer at a time (peak memory: one dense layer and its MoE layer, plus the
    runtime). Equals moe_compile.convert + save_hf for the same config."""
    where = "convert_hf_checkpoint"
    config = config if config is not None else MoEConfig()
    if not isinstance(config, MoEConfig):
        raise TypeError(f"{where}: config must be a MoEConfig, got {type(config).__name__}.")
    checkpoint = SourceCheckpoint(source_dir, where)
    source = checkpoint.config
    target = choose_architecture(source, False, architecture, where)
    check_routing(Routing.of_config(config), target, where)
    activation = _activation(source, where)
    count = source["num_hidden_layers"]
    by_layer = _group_by_layer(dict.fromkeys(checkpoint.names()), count, where)
    for i in range(count):
        ffn_names = {f"model.layers.{i}.mlp.{name}.weight" for name in FFN_NAMES}
        mlp = {name for name in by_layer[i] if name.startswith(f"model.layers.{i}.mlp.")}
        extra = sorted(mlp - ffn_names)
        if not ffn_names <= set(by_layer[i]) or extra:
            raise HFCheckpointError(f"{where}: decoder layer {i} of {source_dir} does not hold the gated MLP "
                                    f"{', '.join(sorted(ffn_names))} alone (missing: "
                                    f"{sorted(ffn_names - set(by_layer[i])) or 'none'}, other: {extra or 'none'}). "
                                    "The checkpoint is incomplete or not a LLaMA / Mistral / Qwen2 checkpoint.")
    config.check_ffn_width(source["intermediate_size"], "model.layers.*.mlp")

    shapes: list[MoEShape] = []
    dtypes: list[torch.dtype] = []
    show = progress if progress is not None else count >= 8

    def layer_group(i: int) -> dict[str, torch.Tensor]:
        tensors = checkpoint.read(by_layer[i])
        gate, up, down = (tensors.pop(f"model.layers.{i}.mlp.{name}.weight") for name in FFN_NAMES)
        ffn = DenseFFN(up_weight=up, up_bias=None, down_weight=down, down_bias=None, activation=activation,
                       gate_weight=gate)
        layer = build_moe_layer(ffn, config, seed=config.seed + i)
        shapes.append(MoEShape.of_layer(layer))
        dtypes.append(up.dtype)
        bar.update()
        return {**tensors, **layer_tensors(layer, i, target, f"{where}: model.layers.{i}.mlp")}

    groups = [lambda: checkpoint.read(by_layer[None])] + [lambda i=i: layer_group(i) for i in range(count)]
    with tqdm(total=count, desc="converting layers", unit="layer", disable=not show) as bar:
        return _write(directory, groups, lambda: (_common_shape(shapes, where), dtypes[0]), source, target,
                      config.load_balance_coef, source_dir)


def _write(directory: PathLike, groups: list[Callable[[], dict]],
           written_shape: Callable[[], tuple[MoEShape, torch.dtype]], source: dict[str, Any], target: str,
           lb_coef: float, source_dir: Optional[PathLike], dense_layers: Sequence[int] = ()) -> HFCheckpoint:
    """Shards and index, then config.json from the MoE layers written (`written_shape`, called after the
    shards: a streamed conversion knows its layers only once it has built them), then the source's tokenizer
    and generation-config files."""
    directory = Path(directory)
    paths = write_shards(directory, groups)
    moe, dtype = written_shape()
    target_config(source, target, moe, dtype, lb_coef, dense_layers).save_pretrained(directory)
    copied = source_files.copy_source_files(source_dir, directory)
    return HFCheckpoint(directory, ARCHITECTURES[target], len(groups) - 1 - len(dense_layers), moe.routing.num_experts,
                        moe.routing.top_k, len(paths), sum(path.stat().st_size for path in paths), copied)


def _group_by_layer(tensors: dict[str, Any], count: int, where: str) -> dict[Optional[int], dict[str, Any]]:
    """{layer index: its entries, None: everything outside the decoder layers}."""
    groups: dict[Optional[int], dict[str, Any]] = {None: {}, **{i: {} for i in range(count)}}
    for name, value in tensors.items():
        match = _LAYER_KEY.match(name)
        layer = int(match.group(1)) if match else None
        if layer is not None and layer not in groups:
            raise HFCheckpointError(f"{where}: {name} belongs to decoder layer {layer}, but the config has "
                                    f"num_hidden_layers={count}. The weights and config.json do not match.")
        groups[layer][name] = value
    return groups


def _common_shape(shapes: list[MoEShape], where: str) -> MoEShape:
    if len(set(shapes)) != 1:
        raise HFCheckpointError(f"{where}: the MoE layers differ ({sorted(set(map(str, shapes)))}); a Mixtral or "
                                "Qwen2-MoE config has one expert count, width and routing for all layers. "
                                f"{OWN_FORMAT}")
    return shapes[0]


def _activation(source: dict[str, Any], where: str) -> str:
    from transformers.activations import ACT2FN

    name = source.get("hidden_act")
    activation = identify_activation(ACT2FN[name]) if name in ACT2FN else None
    if activation is None:
        raise HFCheckpointError(f"{where}: the source's hidden_act {name!r} is not an activation moe_compile knows "
                                f"(silu, gelu, gelu_tanh, relu). {OWN_FORMAT}")
    return activation


__all__ = ["HFCheckpoint", "convert_hf_checkpoint", "save_hf"]
