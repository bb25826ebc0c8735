"""Text generation with a decoder exported by `export(..., task="text-generation")`, in ONNX Runtime.

Each step runs the decoder on the new tokens and the cache, and picks every sequence's next token from its last
logits l:
    greedy     argmax l
    sampled    draw from softmax(l / temperature), restricted to the top_k most likely tokens (0: all) and then to
               the smallest set of most likely tokens whose probability reaches top_p, with a seeded generator
The prompt is one prefill call (past length 0); each later call feeds one token per sequence. The cache never leaves
ONNX Runtime (IO binding). A decoder exported with shared cache buffers (`decoder.share_cache_buffers`: the `ort`
target) gets one buffer per layer's keys and values, allocated once for the longest prompt + max_new_tokens and
bound as both the past input and the present output, so each step writes only its new keys and values, in place;
otherwise the present outputs of a step are bound as the past inputs of the next (each step copies the past).

Batches are left-padded: attention_mask is 0 on the pads and position_ids = max(cumsum(mask) - 1, 0), as
transformers computes them, so a sequence's tokens do not depend on its batch-mates or on its padding. A decoder
whose model takes no attention mask (a hand-written GPT) generates batches of prompts of one length only.
A sequence stops at a stop token (default: the model's eos tokens) or after max_new_tokens; a stopped sequence is
fed the pad token until the others stop.
Needs no transformers at run time: `tokenizers` reads tokenizer.json when text is given.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import MoECompileError
from .decoder import METADATA_FILE
from .weight_only import exact_options

Prompts = Union[str, Sequence[str], Sequence[Sequence[int]], np.ndarray]
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # the new tokens of each sequence (up to and including its stop token)
    prompt_lengths: list[int]
    time_to_first_token_s: float  # the prefill call, prompt to the first new token
    step_times_s: list[float] = field(default_factory=list)  # every later decode step
    kv_cache_bytes: int = 0  # the cache after the last step (where shared: its preallocated buffers)
    text: Optional[list[str]] = None  # decoded, when the prompts were text

    @property
    def per_token_latency_s(self) -> float:
        """Median time of one decode step (one new token for every sequence of the batch)."""
        return float(np.median(self.step_times_s)) if self.step_times_s else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """New tokens of the whole batch per second of decoding (prefill excluded)."""
        total = sum(self.step_times_s)
        return len(self.tokens) * len(self.step_times_s) / total if total > 0 else float("nan")

    def summary(self) -> str:
        return (f"{len(self.tokens)} x {max(map(len, self.tokens), default=0)} new tokens, time to first token "
                f"{self.time_to_first_token_s * 1e3:.1f} ms, {self.per_token_latency_s * 1e3:.2f} ms per token "
                f"({self.tokens_per_s:.1f} tokens/s), KV cache {self.kv_cache_bytes / 2**20:.1f} MiB")


class Generator:
    """An exported decoder directory loaded in ONNX Runtime, ready to generate."""

    def __init__(self, directory: Union[str, os.PathLike], threads: Optional[int] = None,
                 providers: Optional[list[str]] = None, routing: bool = False):
        """routing=True: every step also returns the graph's routing selections (for check_generation)."""
        import onnxruntime as ort

        from .parity import session_with_selections

        self.directory = Path(directory)
        metadata_path = self.directory / METADATA_FILE
        if not metadata_path.is_file():
            onnx_hint = (" It looks like a prompt-only ONNX file: export with task='text-generation' (moe-compile "
                         "export --task text-generation) to get a decoder with a KV cache."
                         if self.directory.suffix == ".onnx" or any(self.directory.glob("*.onnx")) else "")
            raise MoECompileError(f"generate: {os.fspath(directory)!r} is not a directory written by "
                                  f"export(task='text-generation') (no {METADATA_FILE}).{onnx_hint}")
        self.metadata = json.loads(metadata_path.read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model_file = os.fspath(self.directory / self.metadata["model_file"])
        if routing:
            self.session, self.selections = session_with_selections(model_file, options, providers)
        else:
            self.session, self.selections = ort.InferenceSession(
                model_file, exact_options(options), providers=providers or ["CPUExecutionProvider"]), []
        self._ort = ort
        self.dtype = _NUMPY_DTYPES[self.metadata["dtype"]]
        self.takes_mask = self.metadata.get("attention_mask", True)
        self.past_names = self.metadata["inputs"][1 + self.takes_mask + self.metadata["position_ids"]:]
        self.present_names = self.metadata["outputs"][1:]
        self.shared_cache = set(self.metadata.get("shared_cache") or [])  # the past inputs bound as their present
        tokenizer_path = self.directory / "tokenizer.json"
        self.tokenizer = None
        if tokenizer_path.is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(os.fspath(tokenizer_path))

    @property
    def stop_tokens(self) -> list[int]:
        return list(self.metadata.get("eos_token_id") or [])

    @property
    def pad_token(self) -> int:
        pad = self.metadata.get("pad_token_id")
        return pad if pad is not None else (self.stop_tokens or [0])[0]

    def encode(self, prompts: Prompts) -> tuple[list[list[int]], bool]:
        """(token ids per prompt, whether the prompts were text)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, np.ndarray):
            prompts = prompts.tolist()
        prompts = list(prompts)
        if not prompts:
            raise MoECompileError("generate: no prompt given.")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise MoECompileError(f"generate: text prompts need a tokenizer, and {self.directory} has no "
                                      "tokenizer.json; pass token ids, or export a model whose directory has one.")
            return [self.tokenizer.encode(p).ids for p in prompts], True
        ids = [[int(t) for t in p] for p in prompts]
        vocab = self.metadata["vocab_size"]
        bad = [t for p in ids for t in p if not 0 <= t < vocab]
        if bad or not all(ids):
            raise MoECompileError(f"generate: every prompt needs at least one token id in [0, {vocab}); got "
                                  f"{'an empty prompt' if not all(ids) else bad[:5]}.")
        return ids, False

    def generate(self, prompts: Prompts, max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_tokens: Optional[Sequence[int]] = None,
                 on_token: Optional[Callable[[list[int]], None]] = None) -> GenerationResult:
        """Generate up to max_new_tokens per prompt (see the module docstring); `on_token` receives each step's
        new token of every sequence, as they come (streaming)."""
        if max_new_tokens < 1:
            raise MoECompileError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}.")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1 or top_k < 0):
            raise MoECompileError(f"generate: sampling needs temperature > 0, 0 < top_p <= 1 and top_k >= 0; got "
                                  f"temperature={temperature}, top_p={top_p}, top_k={top_k}.")
        ids, is_text = self.encode(prompts)
        if not self.takes_mask and len(set(map(len, ids))) > 1:
            raise MoECompileError(f"generate: the decoder in {self.directory} takes no attention mask (its model has "
                                  "none), so it cannot left-pad a batch; give prompts of one length, or generate them "
                                  "one at a time.")
        stops = set(self.stop_tokens if stop_tokens is None else stop_tokens)
        rng = np.random.default_rng(seed)
        batch, longest = len(ids), max(map(len, ids))
        tokens = np.full((batch, longest), self.pad_token, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        for row, prompt in enumerate(ids):  # left padding
            tokens[row, longest - len(prompt):] = prompt
            mask[row, longest - len(prompt):] = 1
        cache = self._empty_cache(batch, longest + max_new_tokens)
        new = [[] for _ in range(batch)]
        finished = np.zeros(batch, dtype=bool)
        step_times, first = [], 0.0
        for step in range(max_new_tokens):
            start = time.perf_counter()
            logits, cache, _ = self._step(tokens, mask, cache)
            picked = _pick(logits[:, -1].astype(np.float64), do_sample, temperature, top_k, top_p, rng)
            picked = np.where(finished, self.pad_token, picked)
            elapsed = time.perf_counter() - start
            if step == 0:
                first = elapsed
            else:
                step_times.append(elapsed)
            for row in np.flatnonzero(~finished):
                new[row].append(int(picked[row]))
            finished |= np.isin(picked, list(stops))
            if on_token is not None:
                on_token(picked.tolist())
            if finished.all():
                break
            tokens = picked[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        result = GenerationResult(new, [len(p) for p in ids], first, step_times,
                                  sum(int(np.prod(v.shape())) * np.dtype(self.dtype).itemsize for v in cache))
        if is_text:
            result.text = [self.tokenizer.decode(seq) for seq in new]
        return result

    def _empty_cache(self, batch: int, capacity: int) -> list:
        """The past of a prefill for every layer's keys and values: buffers for `capacity` positions where shared,
        else past length 0."""
        def empty(name: str) -> np.ndarray:
            length = capacity if name in self.shared_cache else 0
            return np.zeros((batch, self.metadata["kv_heads"], length, self.metadata["head_dim"]), dtype=self.dtype)

        return [self._ort.OrtValue.ortvalue_from_numpy(empty(name)) for name in self.past_names]

    def _step(self, tokens: np.ndarray, mask: np.ndarray, cache: list) -> tuple[np.ndarray, list, list]:
        """One decoder call on `tokens` [b, s] (the last s positions of `mask`) -> (logits, present cache, routing
        selections: empty unless the generator was made with routing=True)."""
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens))
        if self.takes_mask:
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        if self.metadata["position_ids"]:
            positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -tokens.shape[1]:]
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions))
        for name, value in zip(self.past_names, cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits")
        for past, name, value in zip(self.past_names, self.present_names, cache):
            if past in self.shared_cache:  # written in place
                binding.bind_ortvalue_output(name, value)
            else:
                binding.bind_output(name)
        for name in self.selections:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cached = len(self.present_names) + 1
        present = [value if past in self.shared_cache else new
                   for past, value, new in zip(self.past_names, cache, outputs[1:cached])]
        return outputs[0].numpy(), present, [value.numpy() for value in outputs[cached:]]

    def teacher_forced(self, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[np.ndarray, list[list]]:
        """Logits [len(continuation) + 1, vocab] of one sequence: the prefill's last position, then one decode step
        per token of `continuation` (the logits after feeding it); and each call's routing selections."""
        tokens = np.asarray([list(prompt)], dtype=np.int64)
        mask = np.ones_like(tokens)
        logits, cache, selections = self._step(tokens, mask, self._empty_cache(1, len(prompt) + len(continuation)))
        rows, routed = [logits[0, -1]], [selections]
        for token in continuation:
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            logits, cache, selections = self._step(np.asarray([[token]], dtype=np.int64), mask, cache)
            rows.append(logits[0, -1])
            routed.append(selections)
        return np.stack(rows).astype(np.float32), routed


def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int, top_p: float,
          rng: np.random.Generator) -> np.ndarray:
    """The next token of each row of `logits` [b, vocab] (module docstring)."""
    if not do_sample:
        return logits.argmax(-1)
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -top_k, axis=-1)[:, -top_k][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, -1)
        keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p  # the smallest prefix reaching top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


def generate(directory: Union[str, os.PathLike], prompts: Prompts, max_new_tokens: int = 32, *,
             threads: Optional[int] = None, **options) -> GenerationResult:
    """Load the exported decoder in `directory` and generate (options: those of Generator.generate)."""
    return Generator(directory, threads=threads).generate(prompts, max_new_tokens, **options)
