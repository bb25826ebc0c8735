"""Sharded safetensors checkpoints, read and written a group of tensors at a time.

Reading: a local Hugging Face directory holds config.json and model.safetensors, or shards listed in
model.safetensors.index.json. `read(names)` opens each shard only while it copies the named tensors out, so
the process never maps more of the checkpoint than the tensors it asked for.

Writing: each group of tensors (here: the embeddings, norm and head, then one decoder layer each) becomes one
shard model-{i:05d}-of-{n:05d}.safetensors, written as soon as the group is made, plus the index
model.safetensors.index.json (total size, tensor -> shard), the layout transformers writes and serving
engines read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import HFCheckpointError

PathLike = Union[str, Path]
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SourceCheckpoint:
    """A dense Hugging Face checkpoint directory, read tensor by tensor."""

    def __init__(self, directory: PathLike, where: str):
        self.directory = Path(directory)
        self.where = where
        config_path = self.directory / "config.json"
        if not self.directory.is_dir():
            raise HFCheckpointError(f"{where}: {self.directory} is not a directory. Pass a local Hugging Face model "
                                    "directory (written by save_pretrained).")
        if not config_path.is_file():
            raise HFCheckpointError(f"{where}: {config_path} is missing. Pass a directory written by save_pretrained.")
        self.config = _transformers_config(self.directory, where)
        self.files = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        """tensor name -> shard file."""
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise HFCheckpointError(f"{self.where}: {index} is damaged ({type(error).__name__}: {error}).") \
                    from None
            files = {name: self.directory / shard for name, shard in weight_map.items()}
            missing = sorted({str(path.name) for path in files.values() if not path.is_file()})
            if missing:
                raise HFCheckpointError(f"{self.where}: {index} lists shards that are not in {self.directory}: "
                                        f"{', '.join(missing)}. Download or copy the whole checkpoint.")
            return files
        single = self.directory / SINGLE_FILE
        if single.is_file():
            with self._open(single) as weights:
                return {name: single for name in weights.keys()}
        raise HFCheckpointError(f"{self.where}: {self.directory} holds no {SINGLE_FILE} or {INDEX_FILE}; streamed "
                                "conversion reads safetensors checkpoints. Re-save the model with "
                                "save_pretrained(directory) (safetensors is its default).")

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise HFCheckpointError(f"{self.where}: {path} is not a readable safetensors file ({error}).") from None

    def names(self) -> list[str]:
        return list(self.files)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, copied out of their shards (each shard is open only while it is read)."""
        by_file = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        tensors = {}
        for path, in_file in by_file.items():
            with self._open(path) as weights:
                for name in in_file:
                    tensors[name] = weights.get_tensor(name)
        return tensors


def write_shards(directory: PathLike, groups: Sequence[Callable[[], dict[str, torch.Tensor]]]) -> list[Path]:
    """Write one shard per group and the index; returns the shard paths.

    Each group is a function that makes its tensors when called, so only one group is in memory at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total, paths = {}, 0, []
    for number, make_group in enumerate(groups, start=1):
        group = make_group()
        path = directory / f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        save_file({name: tensor.contiguous() for name, tensor in group.items()}, str(path),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, path.name))
        total += sum(tensor.numel() * tensor.element_size() for tensor in group.values())
        paths.append(path)
        del group
    for stale in set(directory.glob("model-?????-of-?????.safetensors")) - set(paths):  # from an earlier save
        stale.unlink()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _transformers_config(directory: Path, where: str) -> dict:
    """config.json as transformers reads it (defaults filled in, as `model.config.to_dict()` has them)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True).to_dict()
    except (ValueError, OSError, TypeError) as error:
        raise HFCheckpointError(f"{where}: {directory / 'config.json'} is not a transformers config "
                                f"({str(error).splitlines()[0]}).") from None
