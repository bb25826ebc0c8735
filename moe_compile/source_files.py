"""The files of a Hugging Face model directory that travel with every output made from it: tokenizer,
chat template and generation config (a converted checkpoint, a saved model, an exported decoder)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

SOURCE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def source_dir(model: nn.Module) -> Optional[Path]:
    """The local directory a transformers model was loaded from (config._name_or_path), or None."""
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(path) if path and Path(path).is_dir() else None


def copy_source_files(source: Optional[Union[str, Path]], directory: Union[str, Path]) -> list[str]:
    """Copy the SOURCE_FILES that `source` has into `directory`; returns their names."""
    directory = Path(directory)
    if source is None or Path(source).resolve() == directory.resolve():
        return []
    copied = []
    for name in SOURCE_FILES:
        if (Path(source) / name).is_file():
            shutil.copyfile(Path(source) / name, directory / name)
            copied.append(name)
    return copied
