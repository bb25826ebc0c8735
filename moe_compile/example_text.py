"""Text every machine has: the Python standard library's own source, for the small trained GPTs and for
`moe-compile eval`.

A fixed list of modules, split by file: TRAIN_FILES train the models and give the calibration batches,
VALIDATION_FILES measure them; stdlib_prose("library") takes the docstrings of every other module too. Bytes are
the tokens of the byte-level GPTs (vocabulary 256); a transformers model's tokenizer tokenizes the same text
(token_ids). The modules' text changes a little between Python
versions, so figures are comparable only on one Python (they were measured on 3.11).

    perplexity = exp(mean over predicted tokens of -log p(next token))
"""

from __future__ import annotations

import ast
import math
import sysconfig
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .model_io import named_outputs

# logit values per forward pass in score (256 MB of float32): on a CPU a batch of windows whose logits are larger runs
# slower, not faster (Gemma 3's 262k vocabulary, 16 windows of 256 tokens: 64 s at once, 16-19 s one by one)
LOGIT_BUDGET = 1 << 26

TRAIN_FILES = (
    "argparse.py", "ast.py", "bisect.py", "calendar.py", "configparser.py", "contextlib.py", "copy.py", "csv.py",
    "dataclasses.py", "difflib.py", "enum.py", "fnmatch.py", "fractions.py", "functools.py", "gettext.py",
    "glob.py", "gzip.py", "heapq.py", "inspect.py", "ipaddress.py", "locale.py", "logging/__init__.py",
    "mimetypes.py", "numbers.py", "operator.py", "optparse.py", "pickle.py", "pprint.py", "queue.py",
    "random.py", "sched.py", "shlex.py", "shutil.py", "socket.py", "statistics.py", "string.py",
    "subprocess.py", "tarfile.py", "tempfile.py", "threading.py", "tokenize.py", "traceback.py", "typing.py",
    "uuid.py", "warnings.py", "weakref.py",
)
VALIDATION_FILES = ("textwrap.py", "ftplib.py", "smtplib.py", "imaplib.py", "codecs.py", "cmd.py")


def stdlib_text(split: str) -> bytes:
    """The concatenated files of one split ("train" or "validation")."""
    files = {"train": TRAIN_FILES, "validation": VALIDATION_FILES}.get(split)
    if files is None:
        raise ValueError(f"stdlib_text: unknown split {split!r}. Use 'train' or 'validation'.")
    root = _stdlib_root()
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"stdlib_text: {root} lacks {missing}; this needs a CPython 3.10+ standard library "
                                "with its .py sources installed.")
    return b"\n".join((root / name).read_bytes() for name in files)


def stdlib_prose(split: str) -> bytes:
    """English prose from the same files: the docstrings (module, class, function) of eight words or more.

    split "library": the docstrings of every module of the standard library but the validation files and the test
    suites, file by file (about 5x the training split's: more varied text to train on, e.g. to heal).
    """
    if split not in ("train", "validation", "library"):
        raise ValueError(f"stdlib_prose: unknown split {split!r}. Use 'train', 'validation' or 'library'.")
    if split != "library":
        return "\n\n".join(_docstrings(stdlib_text(split))).encode()
    root = _stdlib_root()
    texts = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.as_posix() in VALIDATION_FILES or any(
                part.startswith("test") or part in ("idle_test", "site-packages") for part in relative.parts):
            continue
        try:
            texts += _docstrings(path.read_bytes())
        except (SyntaxError, ValueError):  # a file of another Python's syntax, or not source
            continue
    return "\n\n".join(texts).encode()


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(source: bytes) -> list[str]:
    """The docstrings of eight words or more of a module's source, in ast.walk order."""
    texts = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text.split()) >= 8:
                texts.append(text)
    return texts


def stdlib_bytes(split: str) -> torch.Tensor:
    """One split's text as a uint8 tensor: the token ids of the byte-level GPTs."""
    return torch.frombuffer(bytearray(stdlib_text(split)), dtype=torch.uint8)


def token_ids(text: bytes, tokenizer: Optional[Any] = None) -> torch.Tensor:
    """`text` as int64 token ids [n]: its bytes, or what a transformers tokenizer makes of it (no special tokens)."""
    if tokenizer is None:
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    ids = tokenizer(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(data: torch.Tensor, length: int, count: int, seed: int) -> torch.Tensor:
    """`count` windows of `length + 1` tokens at seeded random offsets, as int64 [count, length + 1]."""
    if len(data) < length + 2:
        raise ValueError(f"windows: {len(data)} tokens are too few for windows of {length + 1}; give more text.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length - 1, (count,), generator=generator)
    return torch.stack([data[s:s + length + 1] for s in starts.tolist()]).long()


def calibration_batches(length: int = 128, count: int = 64, batch_size: int = 16, seed: int = 1,
                        split: str = "train", data: Optional[torch.Tensor] = None,
                        bos: Optional[int] = None) -> list[torch.Tensor]:
    """Token-id batches [batch, length] for convert(calibration_data=...), drawn from `data` (token ids [n]),
    by default the bytes of one split of the standard library text; each window led by `bos` when given."""
    ids = windows(stdlib_bytes(split) if data is None else data, length - (bos is not None), count, seed)[:, :-1]
    if bos is not None:
        ids = torch.cat([torch.full((count, 1), bos, dtype=torch.long), ids], dim=1)
    return list(ids.split(batch_size))


def perplexity(model: torch.nn.Module, data: torch.Tensor, length: int = 128, batch_size: int = 32,
               max_windows: int = 256, progress: Callable[[Iterator], Iterator] = iter,
               bos: Optional[int] = None) -> float:
    """Perplexity of `model` on consecutive non-overlapping windows of `data` (at most `max_windows`).

    bos: a token id put before every window (models such as Gemma want it); it is context, never scored, so
    each window scores the same `length` predictions with or without it.
    """
    return score(model, data, length, batch_size, max_windows, progress, bos)[0]


@torch.no_grad()
def score(model: torch.nn.Module, data: torch.Tensor, length: int = 128, batch_size: int = 32,
          max_windows: int = 256, progress: Callable[[Iterator], Iterator] = iter,
          bos: Optional[int] = None, spread: bool = False) -> tuple[float, torch.Tensor]:
    """(perplexity, the model's top-1 next-token predictions [windows, length]) on the windows of `perplexity`;
    the share of predictions two models agree on is their top-1 agreement. spread: the windows evenly spaced over
    the whole of `data` instead of consecutive from its start (a few windows then sample all of a long text).
    batch_size: windows per forward pass, fewer where their logits would pass LOGIT_BUDGET values."""
    inputs, targets = scored_windows(data, length, max_windows, bos, spread)
    total, predictions = 0.0, []
    for logits, y in window_logits(model, inputs, targets, bos is not None, batch_size, progress):
        predictions.append(logits.argmax(-1))
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
    return math.exp(total / targets.numel()), torch.cat(predictions)


def scored_windows(data: torch.Tensor, length: int, max_windows: int, bos: Optional[int] = None,
                   spread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [windows, length], or [windows, length + 1] led by `bos` when given; targets [windows, length], the
    next tokens): the windows `score` scores, consecutive from the start of `data` or, spread, evenly spaced over it."""
    count = min((len(data) - 1) // length, max_windows)
    if count < 1:
        raise ValueError(f"perplexity: {len(data)} tokens do not fill one window of {length + 1}; give more text.")
    stride = (len(data) - 1 - length) // max(count - 1, 1) if spread else length
    ids = torch.stack([data[i * stride: i * stride + length + 1] for i in range(count)]).long()
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if bos is not None:
        inputs = torch.cat([torch.full((count, 1), bos, dtype=torch.long), inputs], dim=1)
    return inputs, targets


@torch.no_grad()
def window_logits(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, bos: bool,
                  batch_size: int = 32, progress: Callable[[Iterator], Iterator] = iter
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits [b, length, vocab] of the scored positions, their targets [b, length]), a few windows at a time: at
    most batch_size, fewer where their logits would pass LOGIT_BUDGET values (the first window alone sets that)."""
    def logits_of(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return named_outputs(model(inputs[start:stop]))["logits"][:, int(bos):], targets[start:stop]

    first = logits_of(0, 1)
    yield first
    size = min(batch_size, max(1, LOGIT_BUDGET // first[0][0].numel()))
    for start in progress(range(1, len(inputs), size)):
        yield logits_of(start, start + size)
