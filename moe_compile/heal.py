"""Healing: train a converted model to the dense model it came from, end to end.

The student's MoE layers (experts, shared experts, biases, routers) learn to reproduce the teacher on the data,
with the errors of every earlier layer in their inputs. The data is one long text (windows of it drawn), or samples
the model sees whole (sentences for an encoder, [CLS] ... [SEP]), padded, padding out of every loss. The losses,
over the tokens t of a batch:

    logits   mean over P sampled positions t of KL(softmax(teacher logits_t) || softmax(student logits_t)), the
             whole output distribution; a transformers causal LM puts only those positions through its LM head
             (logits_to_keep), so a 262k vocabulary costs P / length of its full price (samples: every token)
    hidden   (1/L) sum_l mean_{t,d} (h_l(student) - h_l(teacher))_{t,d}^2 / var_t(h_l(teacher)_d) over the L block
             outputs of a transformers model (the last after the final norm), each feature scaled by its variance
             over the tokens (a few massive features would otherwise be the whole loss); no LM head
    logits+hidden   their sum: the default for transformers models (logits alone for others)

Routers learn too: a weighted combine's gates carry their gradient, and an unweighted one (split experts) passes it
straight through (moe/layer.py). AdamW, linear warm-up over the first 5% of the steps, then cosine decay to
10% of the rate; gradients clipped to norm 1. The batch of step s is drawn from a generator seeded with
(seed, s): windows at random starts; or, samples being sorted by length, the run of them from a random place in
that order (upward, then downward from it) until it holds batch_size x length tokens, so that a batch pads little.
A run is deterministic for its seed and a resumed run equals an uninterrupted one: the checkpoint
(safetensors weights and optimizer moments, a JSON of the step and the settings) is written every
`checkpoint_every` steps, at the end, and when the run is interrupted.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .errors import MoECompileError
from .example_text import perplexity
from .model_io import named_outputs
from .moe.layer import iter_moe_layers

LOSSES = ("logits", "hidden", "logits+hidden")
CHECKPOINT_STATE = "heal_state.json"
CHECKPOINT_TENSORS = "heal_tensors.safetensors"
WARMUP, FINAL_LR = 0.05, 0.1


class HealingError(MoECompileError):
    """Healing cannot run with the given model, teacher or settings."""


@dataclass
class HealReport:
    """What a healing run did: tokens trained on, time, peak memory, the loss and held-out perplexity curve."""

    tokens: int
    steps: int
    seconds: float
    peak_memory_mb: float  # of the whole process, so far
    settings: dict
    losses: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, training loss) of every step
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, held-out perplexity)
    teacher_perplexity: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        from .table import format_table

        rows = [("tokens", "held-out perplexity", "vs teacher")]
        for tokens, value in self.curve:
            ratio = f"{value / self.teacher_perplexity:.3f}x" if self.teacher_perplexity else "-"
            rows.append((f"{tokens:,}", f"{value:.3f}", ratio))
        title = (f"healing: {self.tokens:,} tokens in {self.steps} steps, {self.seconds:.0f} s, peak memory "
                 f"{self.peak_memory_mb:,.0f} MB (teacher perplexity "
                 f"{'-' if self.teacher_perplexity is None else f'{self.teacher_perplexity:.3f}'})")
        return format_table(rows, title)


def heal(model: nn.Module, teacher: nn.Module, data: Union[torch.Tensor, Sequence[Sequence[int]]],
         tokens: int = 100_000, length: int = 256,
         batch_size: int = 4, loss: Optional[str] = None, positions: Optional[int] = 64, lr: float = 1e-4,
         train: Union[str, Sequence[str]] = "moe", bos: Optional[int] = None,
         eval_data: Optional[torch.Tensor] = None, eval_every: Optional[int] = None, eval_windows: int = 8,
         checkpoint_dir: Union[str, Path, None] = None, checkpoint_every: int = 50, seed: int = 0,
         progress: bool = True, on_step: Optional[Callable[[HealReport], None]] = None) -> HealReport:
    """Train `model` (a converted model, in place) to `teacher` (its dense source) on `tokens` tokens of `data`.

    data: token ids [n] of one long text, windows of `length` tokens drawn from it (`bos` leading each when the model
    wants one, e.g. Gemma); or samples, a list of token id sequences each seen whole (its special tokens included,
    cut to `length`), batch_size x length tokens of them per step. loss: one of LOSSES ("logits": any model
    returning logits; "hidden": transformers models; default "logits+hidden" where both models give hidden states,
    else "logits"), the logits scored at `positions` sampled positions per window (None: every position; samples
    score every token). train: "moe" (the MoE layers' parameters), "all", or the parameter-name prefixes to train
    (e.g. a pruned dense baseline's FFN modules).
    eval_data: token ids [n] whose held-out perplexity is measured before, every `eval_every` tokens and after.
    checkpoint_dir: where the run is saved, and resumed from when it holds a checkpoint of the same settings.
    on_step(report) is called after each step, with the report so far. Returns the HealReport; the model is left
    in eval mode.
    """
    if loss is None:
        loss = "logits+hidden" if _backbone(model) is not None and _backbone(teacher) is not None else "logits"
    settings = dict(tokens=tokens, length=length, batch_size=batch_size, loss=loss, positions=positions, lr=lr,
                    train=train if isinstance(train, str) else list(train), bos=bos, seed=seed,
                    data="windows" if isinstance(data, torch.Tensor) else "samples")
    _check(model, teacher, data, settings)
    if not isinstance(data, torch.Tensor):
        data = sorted((torch.as_tensor(sample, dtype=torch.long)[:length] for sample in data), key=len)
    params = _trainable(model, train)
    steps = max(tokens // (batch_size * length), 1)
    optimizer = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, steps))
    report = HealReport(tokens=0, steps=0, seconds=0.0, peak_memory_mb=0.0, settings=settings)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint is not None and (checkpoint / CHECKPOINT_STATE).is_file():
        _resume(checkpoint, settings, params, optimizer, schedule, report)

    def evaluate() -> None:
        if eval_data is not None:
            value = perplexity(model, eval_data, length=length, max_windows=eval_windows, bos=bos)
            report.curve.append((report.tokens, value))

    model.eval()  # no dropout: the run is deterministic; gradients flow all the same
    teacher.eval()
    if eval_data is not None and report.teacher_perplexity is None:
        report.teacher_perplexity = perplexity(teacher, eval_data, length=length, max_windows=eval_windows, bos=bos)
    if not report.curve:
        evaluate()
    per_step = batch_size * length
    eval_steps = max(eval_every // per_step, 1) if eval_every else None
    bar = _progress_bar(steps, report.steps, progress)
    start = time.perf_counter() - report.seconds
    try:
        with _only_trainable(model, params):
            while report.steps < steps:
                batch = _batch(data, report.steps, seed, batch_size, length, bos, positions)
                value = _loss(model, teacher, batch, loss)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                value = float(value.detach())
                torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
                optimizer.step()
                schedule.step()
                report.steps += 1
                report.tokens += batch.tokens
                report.losses.append((report.tokens, value))
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if on_step is not None:
                    on_step(report)
                if eval_steps and report.steps % eval_steps == 0 and report.steps < steps:
                    evaluate()
                report.seconds = time.perf_counter() - start
                if checkpoint is not None and report.steps % checkpoint_every == 0:
                    _save(checkpoint, settings, params, optimizer, schedule, report)
    except KeyboardInterrupt:
        if checkpoint is not None:
            _save(checkpoint, settings, params, optimizer, schedule, report)
        raise
    finally:
        bar.close()
    if not report.curve or report.curve[-1][0] != report.tokens:
        evaluate()
    report.seconds = time.perf_counter() - start
    report.peak_memory_mb = _peak_memory_mb()
    if checkpoint is not None:
        _save(checkpoint, settings, params, optimizer, schedule, report)
    return report


def _peak_memory_mb() -> float:
    """The process's peak resident memory (0 where the platform does not say: Windows)."""
    try:
        import resource
    except ImportError:
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check(model: nn.Module, teacher: nn.Module, data: Union[torch.Tensor, Sequence], settings: dict) -> None:
    if settings["train"] == "moe" and not any(True for _ in iter_moe_layers(model)):
        raise HealingError(f"heal: {type(model).__name__} has no MoE layers. Pass the model moe_compile.convert "
                           "returned (or moe_compile.load reads), and its dense source as the teacher.")
    if settings["loss"] not in LOSSES:
        raise HealingError(f"heal: loss={settings['loss']!r} is not one of {', '.join(LOSSES)}.")
    if isinstance(settings["train"], str) and settings["train"] not in ("moe", "all"):
        raise HealingError(f"heal: train={settings['train']!r}: use 'moe' (the MoE layers), 'all', or a list of "
                           "parameter-name prefixes.")
    if isinstance(data, torch.Tensor):
        if data.dim() != 1 or data.dtype.is_floating_point:
            raise HealingError(f"heal: data must be token ids [n] (an integer tensor), got {data.dtype} "
                               f"{list(data.shape)}. Tokenize the text and concatenate it, or pass a list of samples.")
        if len(data) < settings["length"] + 2:
            raise HealingError(f"heal: {len(data)} tokens of data are too few for windows of {settings['length']}; "
                               "give more text or a smaller length.")
    else:
        _check_samples(model, data, settings)
    embeddings = [_input_embeddings(net) for net in (model, teacher)]
    if None not in embeddings and (embeddings[0].shape != embeddings[1].shape
                                   or not torch.equal(embeddings[0], embeddings[1].to(embeddings[0]))):
        raise HealingError("heal: the teacher's input embeddings differ from the model's: the teacher must be the "
                           "dense model the MoE model was converted from.")
    if settings["positions"] is not None and settings["positions"] < 1:
        raise HealingError(f"heal: positions={settings['positions']}: score at least one position per window, or "
                           "pass None for all.")
    if "hidden" in settings["loss"]:
        for role, net in (("model", model), ("teacher", teacher)):
            if _backbone(net) is None:
                raise HealingError(f"heal: loss={settings['loss']!r} reads the block outputs of a transformers model "
                                   f"(output_hidden_states), which the {role} ({type(net).__name__}) does not give. "
                                   "Use loss='logits'.")


def _check_samples(model: nn.Module, samples: Sequence, settings: dict) -> None:
    lengths = [len(sample) if isinstance(sample, (torch.Tensor, list, tuple)) else -1 for sample in samples]
    if not lengths or min(lengths) < 1 or any(isinstance(sample, torch.Tensor) and (
            sample.dim() != 1 or sample.dtype.is_floating_point) for sample in samples):
        raise HealingError("heal: samples must be a non-empty list of token id sequences (lists or integer tensors "
                           "[n], n >= 1), each one sample as the model sees it; or pass one long text as token ids "
                           "[n].")
    if settings["bos"] is not None:
        raise HealingError("heal: bos leads windows of one long text; samples carry their own special tokens. Pass "
                           "bos=None, or tokenize each sample with them.")
    if "attention_mask" not in inspect.signature(model.forward).parameters:
        raise HealingError(f"heal: samples are padded to a batch, which needs a model taking attention_mask; "
                           f"{type(model).__name__}.forward does not. Pass one long text as token ids [n].")


def _input_embeddings(model: nn.Module) -> Optional[torch.Tensor]:
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    return module.weight.detach() if isinstance(getattr(module, "weight", None), torch.Tensor) else None


def _trainable(model: nn.Module, train: Union[str, list[str]]) -> dict[str, nn.Parameter]:
    if train == "moe":
        return {f"{prefix}.{name}": p for prefix, layer in iter_moe_layers(model)
                for name, p in layer.named_parameters()}
    chosen = {name: p for name, p in model.named_parameters() if train == "all" or name.startswith(tuple(train))}
    if not chosen:
        raise HealingError(f"heal: no parameter of {type(model).__name__} starts with any of {train}.")
    return chosen


class _only_trainable:
    """requires_grad on `params` only, for the run; every parameter's flag restored after."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter]):
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.chosen = {id(p) for p in params.values()}

    def __enter__(self):
        for p, _ in self.flags:
            p.requires_grad_(id(p) in self.chosen)

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(int(WARMUP * steps), 1)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Batch(NamedTuple):
    """One step's input_ids [batch, length], attention_mask (None: windows, no padding), the scored positions (the
    columns of windows; None: every token of samples), and how many tokens it holds (padding not counted)."""

    ids: torch.Tensor
    mask: Optional[torch.Tensor]
    scored: Optional[torch.Tensor]
    tokens: int


def _batch(data: Union[torch.Tensor, list[torch.Tensor]], step: int, seed: int, batch_size: int, length: int,
           bos: Optional[int], positions: Optional[int]) -> Batch:
    """Step `step`'s batch, drawn from a generator seeded with (seed, step): windows of the text `data` (BOS first
    when given; the scored positions sorted, never the BOS one), or a run of the samples `data` (sorted by length)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if not isinstance(data, torch.Tensor):
        start = int(torch.randint(0, len(data), (1,), generator=generator))
        run, tokens = [], 0
        for sample in data[start:] + data[:start][::-1]:
            if tokens >= batch_size * length:
                break
            run.append(sample)
            tokens += len(sample)
        ids = nn.utils.rnn.pad_sequence(run, batch_first=True)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(sample) for sample in run], batch_first=True)
        return Batch(ids, mask, None, tokens)
    first = int(bos is not None)
    starts = torch.randint(0, len(data) - length + first, (batch_size,), generator=generator)
    ids = torch.stack([data[s:s + length - first] for s in starts.tolist()]).long()
    if bos is not None:
        ids = torch.cat([torch.full((batch_size, 1), bos, dtype=torch.long), ids], dim=1)
    scored = torch.arange(first, length)
    if positions is not None and positions < len(scored):
        scored = scored[torch.randperm(len(scored), generator=generator)[:positions].sort().values]
    return Batch(ids, None, scored, batch_size * length)


def _backbone(model: nn.Module) -> Optional[nn.Module]:
    """The transformers body that returns hidden states (the model without its LM head), or None."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) and hasattr(getattr(base, "config", None), "output_hidden_states") \
        else None


def _outputs(model: nn.Module, batch: Batch, logits: bool, hidden: bool):
    """(logits at the scored positions [positions, vocab] or None, the block outputs or None) of one forward pass."""
    inputs = {"input_ids": batch.ids, **({} if batch.mask is None else {"attention_mask": batch.mask})}
    if not logits:
        return None, _backbone(model)(**inputs, output_hidden_states=True, use_cache=False).hidden_states[1:]
    if batch.scored is not None and "logits_to_keep" in inspect.signature(model.forward).parameters:
        out = model(**inputs, use_cache=False, output_hidden_states=hidden, logits_to_keep=batch.scored)
        return out.logits.flatten(0, 1), out.hidden_states[1:] if hidden else None  # [0], the embedding, is shared
    if hidden:  # a transformers model scoring every position (an encoder's masked-LM head, or samples)
        out = model(**inputs, output_hidden_states=True)
        return _scored(out.logits, batch), out.hidden_states[1:]
    output = model(batch.ids) if batch.mask is None else model(batch.ids, attention_mask=batch.mask)
    return _scored(named_outputs(output)["logits"], batch), None


def _scored(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The logits [batch, length, vocab] at the batch's scored positions (the columns, or every unpadded token)."""
    return logits[:, batch.scored].flatten(0, 1) if batch.scored is not None else logits[batch.mask.bool()]


def _loss(model: nn.Module, teacher: nn.Module, batch: Batch, loss: str) -> torch.Tensor:
    """The loss of the module docstring on one batch."""
    logits, hidden = "logits" in loss, "hidden" in loss
    with torch.no_grad():
        target_logits, target_hidden = _outputs(teacher, batch, logits, hidden)
    student_logits, student_hidden = _outputs(model, batch, logits, hidden)
    terms = []
    if logits:
        _same_shapes((student_logits,), (target_logits,))
        terms.append(F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(target_logits.float(), -1),
                              log_target=True, reduction="batchmean"))
    if hidden:
        _same_shapes(student_hidden, target_hidden)
        weight = torch.ones_like(batch.ids) if batch.mask is None else batch.mask
        weight = weight.unsqueeze(-1).to(target_hidden[0].dtype)
        count = weight.sum()

        def error(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # over unpadded tokens only
            mean = (target * weight).sum((0, 1)) / count
            variance = ((target - mean).pow(2) * weight).sum((0, 1)) / (count - 1).clamp_min(1)
            return ((student - target).pow(2) / variance.clamp_min(1e-6) * weight).sum() / (count * target.shape[-1])

        terms.append(torch.stack([error(s, t) for s, t in zip(student_hidden, target_hidden)]).mean())
    return sum(terms)


def _same_shapes(outputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...]) -> None:
    shapes = [tuple(t.shape) for t in outputs], [tuple(t.shape) for t in targets]
    if shapes[0] != shapes[1]:
        raise HealingError(f"heal: the model's outputs {shapes[0][:2]}... do not match the teacher's "
                           f"{shapes[1][:2]}...: the teacher must be the dense model the MoE model was converted from.")


def _progress_bar(total: int, done: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not enabled, desc="healing", unit="step")


def _save(directory: Path, settings: dict, params: dict, optimizer: torch.optim.Optimizer, schedule, report) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{name}": p.detach().contiguous() for name, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"{key}.{name}"] = value.detach().contiguous()
    save_file(tensors, str(directory / CHECKPOINT_TENSORS))
    state = {"settings": settings, "schedule": schedule.state_dict(), "report": report.to_dict()}
    (directory / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1) + "\n")


def _resume(directory: Path, settings: dict, params: dict, optimizer: torch.optim.Optimizer, schedule,
            report: HealReport) -> None:
    state = json.loads((directory / CHECKPOINT_STATE).read_text())
    if state["settings"] != settings:
        changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise HealingError(f"heal: {directory} holds a run with other settings ({', '.join(changed)} differ). "
                           "Resume with the same settings, or pass another checkpoint_dir.")
    tensors = load_file(str(directory / CHECKPOINT_TENSORS))
    with torch.no_grad():
        for name, p in params.items():
            if f"param.{name}" not in tensors:
                raise HealingError(f"heal: {directory} has no weights for {name}: it was written for another model.")
            p.copy_(tensors[f"param.{name}"])
            moments = {key.split(".", 1)[0]: value for key, value in tensors.items()
                       if not key.startswith("param.") and key.split(".", 1)[1] == name}
            if moments:
                optimizer.state[p] = moments
    schedule.load_state_dict(state["schedule"])
    for group, rate in zip(optimizer.param_groups, schedule.get_last_lr()):
        group["lr"] = rate
    for key, value in state["report"].items():
        setattr(report, key, [tuple(v) for v in value] if key in ("losses", "curve") else value)
