"""Save and load converted models: safetensors weights plus a JSON recipe that says how to rebuild them.

    directory/model.safetensors   the converted model's state dict (tied weights stored once)
    directory/moe_recipe.json     format version, source architecture, MoEConfig and per-site settings, converted
                                  sites, dtype, the layers whose experts quantize_experts rounded
    directory/tokenizer.json ...  the source directory's tokenizer and generation files, when it had them

`load` rebuilds the dense source model (a `transformers` class from its config, the embedded example from its
name and GPTConfig, or the fresh dense instance a caller passes for their own class), re-applies `convert`
with the recorded MoEConfig and per-site settings (only the layout: calibrated parts need no data, their
weights are loaded), checks that it finds the recorded sites, then loads the weights strictly. No pickle is
read or written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .config import MoEConfig
from .errors import RecipeError
from .example_models import EXAMPLE_MODELS, GPTConfig, build_example
from .model_io import ModelInputs
from .moe import iter_moe_layers
from .passes import convert
from .source_files import copy_source_files, source_dir

FORMAT = "moe_compile.recipe"
FORMAT_VERSION = 1
RECIPE_FILE = "moe_recipe.json"
WEIGHTS_FILE = "model.safetensors"

PathLike = Union[str, Path]
_SAME_ARCHITECTURE = "Pass a dense instance of the architecture the model was saved from, with its configuration."


def save(model: nn.Module, directory: PathLike) -> Path:
    """Write a converted model to `directory` (created if missing); returns the directory."""
    report = getattr(model, "moe_report", None)
    if report is None or not report.converted:
        raise RecipeError(f"save: {type(model).__name__} has no converted MoE sites. Convert it first with "
                          "moe_compile.convert(model, MoEConfig(...)), then save the model convert returns.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recipe = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": _describe_source(model),
        "moe_config": report.config.to_dict(),
        "layer_configs": {name: c and c.to_dict() for name, c in report.layer_configs.items()},
        "sites": _site_list(report),
        "dtype": str(_dtype(model)).removeprefix("torch."),
        "example_inputs": report.example_inputs,  # convert's torch.export search inputs (shapes, dtypes), or None
        "expert_weight_bits": {name: list(layer.expert_weight_bits) for name, layer in iter_moe_layers(model)
                               if layer.expert_weight_bits is not None},  # quantize_experts: [bits, block size]
    }
    save_model(model, str(directory / WEIGHTS_FILE))
    (directory / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    copy_source_files(source_dir(model), directory)  # tokenizer and generation config, for export and generate
    return directory


def load(directory: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """The converted model saved in `directory`, in eval mode.

    `model`: a fresh dense instance to convert and fill (required when the source is the caller's own class;
    it is converted in place). Raises RecipeError when the directory is damaged or does not match the model.
    """
    directory = Path(directory)
    recipe = read_recipe(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise RecipeError(f"load: {weights} is missing. Save the model again with moe_compile.save(model, "
                          f"{str(directory)!r}).")
    dense = model if model is not None else _rebuild_source(recipe["source"])
    dense.to(getattr(torch, recipe["dtype"]))
    try:
        converted = convert(dense, MoEConfig.from_dict(recipe["moe_config"]), layer_configs=_layer_configs(recipe),
                            inplace=True, example_inputs=_example_inputs(recipe), weights_follow=True)
    except ValueError as error:  # no FFN at all, or an FFN width the recorded config cannot split
        raise RecipeError(f"load: cannot re-apply the recorded conversion to {type(dense).__name__}: "
                          f"{str(error).splitlines()[0]} {_SAME_ARCHITECTURE}") from None
    found = _site_list(converted.moe_report)
    if found != recipe["sites"]:
        raise RecipeError(_site_mismatch(type(dense).__name__, recipe["sites"], found))
    _load_weights(converted, weights)
    layers = dict(iter_moe_layers(converted))
    for name, (bits, block_size) in recipe.get("expert_weight_bits", {}).items():
        if name not in layers:
            raise RecipeError(f"load: the recipe's quantized layer {name!r} is no MoE layer of the rebuilt model. "
                              "Save the model again.")
        layers[name].expert_weight_bits = (bits, block_size)  # the weights loaded are already the rounded ones
    if hasattr(getattr(converted, "config", None), "_name_or_path"):
        converted.config._name_or_path = str(directory)  # where its tokenizer files are (see save)
    return converted.eval()


def read_recipe(directory: PathLike) -> dict[str, Any]:
    """The parsed and checked moe_recipe.json of a saved model directory."""
    directory = Path(directory)
    path = directory / RECIPE_FILE
    if not directory.is_dir():
        raise RecipeError(f"load: {directory} is not a directory. Pass the directory moe_compile.save wrote.")
    if not path.is_file():
        raise RecipeError(f"load: {path} is missing, so {directory} was not written by moe_compile.save. "
                          "Pass the directory moe_compile.save wrote.")
    try:
        recipe = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecipeError(f"load: {path} is not valid JSON ({error}). Save the model again.") from None
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise RecipeError(f"load: {path} is not a moe_compile recipe (no \"format\": \"{FORMAT}\"). "
                          "Pass the directory moe_compile.save wrote.")
    if recipe.get("format_version") != FORMAT_VERSION:
        raise RecipeError(f"load: {path} has format version {recipe.get('format_version')!r}, this moe_compile "
                          f"reads version {FORMAT_VERSION}. Load it with the moe_compile version that saved it.")
    missing = [key for key in ("source", "moe_config", "sites", "dtype") if key not in recipe]
    if missing:
        raise RecipeError(f"load: {path} lacks {', '.join(missing)}. Save the model again.")
    if not isinstance(recipe["source"], dict) or not isinstance(recipe["sites"], list):
        raise RecipeError(f"load: {path} is damaged (\"source\" must be an object, \"sites\" a list). "
                          "Save the model again.")
    if not isinstance(getattr(torch, str(recipe["dtype"]), None), torch.dtype):
        raise RecipeError(f"load: {path} names an unknown dtype {recipe['dtype']!r}. Save the model again.")
    try:
        MoEConfig.from_dict(recipe["moe_config"])
        _layer_configs(recipe)
    except (TypeError, ValueError, AttributeError) as error:
        raise RecipeError(f"load: {path} holds an invalid MoEConfig ({error}). Save the model again.") from None
    return recipe


def _layer_configs(recipe: dict[str, Any]) -> dict[str, Optional[MoEConfig]]:
    """The recorded per-site settings (recipes written before them have none)."""
    return {name: c and MoEConfig.from_dict(c) for name, c in recipe.get("layer_configs", {}).items()}


def _example_inputs(recipe: dict[str, Any]) -> Optional[ModelInputs]:
    """Zeros shaped like the inputs convert searched with (only their shapes matter), or None."""
    specs = recipe.get("example_inputs")
    if specs is None:
        return None
    try:
        return ModelInputs.from_spec(specs)
    except (KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise RecipeError(f"load: the recipe's example_inputs are damaged ({type(error).__name__}: {error}). "
                          "Save the model again.") from None


def _describe_source(model: nn.Module) -> dict[str, Any]:
    """How to rebuild the dense model: a transformers class and config, an embedded example, or a user class."""
    cls = type(model)
    name = getattr(model, "example_name", None)
    if name in EXAMPLE_MODELS and isinstance(getattr(model, "config", None), GPTConfig):
        return {"kind": "example", "name": name, "config": model.config.to_dict()}
    if cls.__module__.startswith("transformers.") and hasattr(getattr(model, "config", None), "to_dict"):
        return {"kind": "huggingface", "class": cls.__name__, "config": model.config.to_dict()}
    return {"kind": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}


def _rebuild_source(source: dict[str, Any]) -> nn.Module:
    """A dense model of the recorded architecture, with random weights (no download)."""
    kind = source.get("kind")
    if kind == "custom":
        raise RecipeError(f"load: the model was saved from your own class {source.get('class')}, which load cannot "
                          "rebuild. Pass a fresh dense instance: moe_compile.load(directory, model=YourModel(...)).")
    try:
        if kind == "example":
            return build_example(source["name"], **source["config"])
        if kind == "huggingface":
            return _build_transformers_model(source["class"], source["config"])
    except (KeyError, TypeError) as error:
        raise RecipeError(f"load: the recipe's source architecture is damaged ({type(error).__name__}: {error}). "
                          "Save the model again.") from None
    raise RecipeError(f"load: unknown source kind {kind!r} in the recipe. Save the model again.")


def _build_transformers_model(class_name: str, config: dict[str, Any]) -> nn.Module:
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise RecipeError(f"load: transformers {transformers.__version__} has no class {class_name!r}. "
                          "Install the transformers version the model was saved with.")
    return cls(cls.config_class.from_dict(config))


def _site_list(report) -> list[dict[str, str]]:
    return [{"name": s.name, "pattern": s.pattern} for s in report.converted]


def _site_mismatch(model_name: str, recorded: list[dict], found: list[dict]) -> str:
    only_recorded = [s["name"] for s in recorded if s not in found]
    only_found = [s["name"] for s in found if s not in recorded]
    return (f"load: the FFN sites converted in {model_name} differ from the recipe's: only in the recipe "
            f"{only_recorded or 'none'}, only in the model {only_found or 'none'}. {_SAME_ARCHITECTURE}")


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load `path` into `model`, refusing wrong shapes, missing and unexpected tensors."""
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt") as weights:
            shapes = {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}
    except (SafetensorError, OSError) as error:
        raise RecipeError(f"load: {path} is not a readable safetensors file ({error}). Save the model again.") \
            from None
    wrong = [f"{key} {shape} (model expects {tuple(expected[key].shape)})"
             for key, shape in shapes.items() if key in expected and shape != tuple(expected[key].shape)]
    if wrong:
        raise RecipeError(f"load: {path} holds tensors of the wrong shape: {', '.join(wrong)}. The weights do not "
                          "belong to this recipe; save the model again.")
    missing, unexpected = load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise RecipeError(f"load: {path} does not match the converted model: missing tensors "
                          f"{sorted(missing) or 'none'}, unexpected tensors {sorted(unexpected) or 'none'}. "
                          "The weights do not belong to this recipe; save the model again.")


def _dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
