"""check_parity: run an exported ONNX file in ONNX Runtime (CPU), or a TensorRT engine (FILE.engine / FILE.plan,
built by export.tensorrt.build_engine), and eager PyTorch on the same inputs, and compare.

Every output of the file is compared with the eager output of the same name. Per output, with a = ONNX Runtime
or TensorRT, b = eager (the model as given, no_grad, eval mode), in float64:
    max_abs  = max |a - b|
    max_rel  = max |a - b| / max |b|           (relative to the output's scale, so near-zero entries do not blow up)
    cosine   = <a, b> / (|a| |b|)              (flattened)
    top1     = share of positions whose argmax over the last axis agrees    (LM logits: the greedy next token)
Pass: max_abs <= tolerance * max(1, max |b|), the tolerance of the exported dtype (TOLERANCES) unless one is given:
an absolute bound for outputs of magnitude up to 1, relative to the output's scale beyond (fp32 rounding grows with
the values: a correct export of a real 270M model differs by 4e-4 on logits up to 178, 2e-6 of their scale, where a
wrong routing decision moves logits by a sizeable share of it).

Routing agreement (ONNX files): every routing selection (each router's `top_k`, in call order: a token's k experts,
or an expert's C tokens of a group) is read from the graph too, as extra outputs of the session, and compared with
eager's as sets: the share of chosen entries that eager chose as well. It is reported, not judged: a near tie one
rounding apart may flip and still leave the logits within the bound; a tie broken differently shows up here first.

A directory written by export(task="text-generation") is checked as a generator (`check_generation`): the prompt
and every decode step through the KV cache against eager PyTorch, teacher-forced on eager's greedy tokens.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..model_io import Inputs, ModelCall, as_model_inputs
from ..moe.routers import Router
from ..table import format_table
from .tensorrt import is_engine, run_engine
from .weight_only import exact_options

# Max abs error of the logits, ONNX Runtime vs eager PyTorch (the fp32 model), per exported dtype; stated for
# logits of magnitude ~1 (max_rel is the scale-free figure). Measured on the 2-layer test models (nanoGPT, GPT-2,
# LLaMA; ort and portable): fp32 <= 1e-6, fp16 <= 1.6e-3 (the fp16 rounding of weights and activations). In fp16 a
# routing decision that is a near tie can flip (seen once with expert choice: one token picked by another expert,
# max abs 0.5); the check then fails, as it should: the deployed model routes that token differently.
# bfloat16 (TensorRT engines only): fp16's tolerance times the ratio of their epsilons (8), not yet measured.
TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}

_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}


@dataclass
class OutputParity:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    top1: Optional[float]  # argmax agreement over the last axis; None for outputs of rank < 2
    tolerance: float
    scale: float = 1.0  # max |b|

    @property
    def bound(self) -> float:
        """The largest max_abs that passes: tolerance * max(1, scale)."""
        return scaled_bound(self.tolerance, self.scale)

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.bound


@dataclass
class RoutingAgreement:
    """Routing choices of the runtime against eager's, over every selection (one per MoE layer call)."""

    selections: int  # top_k selections compared
    choices: int  # chosen entries compared (token choice: T k per layer; expert choice: G E C)
    agreed: int  # of them, chosen by eager as well

    @property
    def share(self) -> float:
        return self.agreed / self.choices if self.choices else 1.0


@dataclass
class ParityReport:
    onnx_path: str
    dtype: str
    outputs: list[OutputParity] = field(default_factory=list)
    runtime: str = "ONNX Runtime (CPU)"
    routing: Optional[RoutingAgreement] = None  # None: no MoE layer, or the selections could not be read (note)
    routing_note: str = ""

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        routing = None if self.routing is None else dict(asdict(self.routing), share=self.routing.share)
        return {"onnx_path": self.onnx_path, "runtime": self.runtime, "dtype": self.dtype, "passed": self.passed,
                "outputs": [dict(asdict(o), passed=o.passed) for o in self.outputs],
                "routing_agreement": routing, "routing_note": self.routing_note}

    def table(self) -> str:
        rows = [("output", "shape", "max abs", "max rel", "cosine", "top-1", "bound", "result")]
        rows += [(o.name, "x".join(map(str, o.shape)), f"{o.max_abs:.3g}", f"{o.max_rel:.3g}", f"{o.cosine:.8f}",
                  "-" if o.top1 is None else f"{o.top1:.2%}", f"{o.bound:.3g}", "PASS" if o.passed else "FAIL")
                 for o in self.outputs]
        text = format_table(rows, f"parity: {self.onnx_path} in {self.runtime} vs eager PyTorch, dtype={self.dtype}")
        return text + _routing_line(self.routing, self.routing_note)

    def __str__(self) -> str:
        return self.table()


def _routing_line(routing: Optional[RoutingAgreement], note: str) -> str:
    if routing is not None:
        return (f"\nrouting: {routing.agreed} of {routing.choices} routing choices ({routing.share:.2%}, "
                f"{routing.selections} selections) agree with eager")
    return f"\nrouting: {note}" if note else ""


def check_parity(model: nn.Module, onnx_path: Union[str, os.PathLike], inputs: Inputs, *,
                 dtype: Optional[torch.dtype] = None, tolerance: Optional[float] = None):
    """Compare `onnx_path` run in ONNX Runtime (CPU), or a TensorRT engine file, with `model` in eager PyTorch;
    a directory from export(task="text-generation") is checked by `check_generation` (inputs: the prompts).

    dtype (default: read from the file's output) picks the tolerance from TOLERANCES; `tolerance`
    overrides it. Check at a batch/sequence shape other than the export's to catch shapes baked into the graph.
    """
    if os.path.isdir(onnx_path):
        return check_generation(model, onnx_path, inputs, tolerance=tolerance)
    inputs = as_model_inputs(inputs, "check_parity")
    if not os.path.isfile(onnx_path):
        raise FileNotFoundError(f"check_parity: no ONNX file at {os.fspath(onnx_path)!r}. Write one with "
                                "moe_compile.export(model, example_inputs, path).")
    graph_choices, note = None, "not read from a TensorRT engine"
    if is_engine(onnx_path):
        engine_outputs = run_engine(onnx_path, inputs.tensors())
        runtime, file_dtype = "TensorRT", next(iter(engine_outputs.values())).dtype
        outputs = {name: value.float().cpu().numpy() for name, value in engine_outputs.items()}
    else:
        runtime = "ONNX Runtime (CPU)"
        outputs, graph_choices, file_dtype = _run_onnxruntime(onnx_path, inputs.tensors())
        note = "" if graph_choices else "no MoE layer in the file"
    dtype = dtype or file_dtype
    if tolerance is None:
        if dtype not in TOLERANCES:
            raise ValueError(f"check_parity: no tolerance stated for {dtype}; pass tolerance=...")
        tolerance = TOLERANCES[dtype]

    was_training = model.training
    eager_choices = []
    hooks = [m.register_forward_hook(lambda module, args, out: eager_choices.append(out.dispatch.choices))
             for m in model.modules() if isinstance(m, Router)]
    try:
        reference = ModelCall(model.eval()).named(inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()

    report = ParityReport(onnx_path=os.fspath(onnx_path), dtype=str(dtype).removeprefix("torch."), runtime=runtime)
    if graph_choices:
        report.routing, report.routing_note = routing_agreement(graph_choices, eager_choices)
    else:
        report.routing_note = note
    missing = [name for name in outputs if name not in reference]
    if missing:
        raise ValueError(f"check_parity: the outputs {missing} of {os.fspath(onnx_path)!r} are not outputs of "
                         f"{type(model).__name__} (it returns {list(reference)}); export the same model again.")
    for name, got in outputs.items():
        report.outputs.append(compare(name, got, reference[name].float().cpu().numpy(), tolerance))
    return report


def _run_onnxruntime(onnx_path, inputs: list[torch.Tensor]) -> tuple[dict[str, np.ndarray], list[np.ndarray],
                                                                       torch.dtype]:
    """({name: value} of every output of the ONNX file, the routing selections of the graph in graph order, the
    first output's dtype) in ONNX Runtime: one session of the file with the selections as extra outputs."""
    session, selections = session_with_selections(onnx_path)
    session_inputs = session.get_inputs()
    if len(session_inputs) != len(inputs):
        raise ValueError(f"check_parity: {onnx_path} takes {len(session_inputs)} inputs "
                         f"({', '.join(i.name for i in session_inputs)}), got {len(inputs)}.")
    values = session.run(None, {i.name: t.detach().cpu().numpy() for i, t in zip(session_inputs, inputs)})
    outputs = session.get_outputs()[:len(values) - len(selections)]
    return ({o.name: np.asarray(v) for o, v in zip(outputs, values)}, values[len(outputs):],
            _ORT_TYPES.get(outputs[0].type, torch.float32))


def session_with_selections(onnx_path, options=None, providers: Optional[list[str]] = None):
    """(an ONNX Runtime session of the file whose last outputs are its routing selections, their names)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise ImportError("check_parity needs ONNX Runtime: pip install 'moe-compile[ort]'.") from error
    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    selections = routing_selections(model)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)
                              for name in selections)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    if external:  # the copy lies beside the file, where the weights' relative paths resolve
        source = os.path.join(os.path.dirname(os.path.abspath(onnx_path)), f".parity-{os.getpid()}.onnx")
        onnx.save(model, source)
    else:
        source = model.SerializeToString()
    try:
        session = ort.InferenceSession(source, exact_options(options),
                                       providers=providers or ["CPUExecutionProvider"])
    finally:
        if external:
            os.remove(source)
    return session, selections


def routing_selections(model: onnx.ModelProto) -> list[str]:
    """The values that hold the graph's routing selections, in graph order: the indices of each `top_k`'s final
    TopK (the only torch.topk with largest=False: the sort of its tie-free keys, see routers/base.py)."""
    found = []
    for node in model.graph.node:
        largest = next((a.i for a in node.attribute if a.name == "largest"), 1)
        source = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
        if node.op_type == "TopK" and largest == 0 and "aten.topk" in source:
            found.append(node.output[1])
    return found


def routing_agreement(graph: list[np.ndarray], eager: list[torch.Tensor]) -> tuple[Optional[RoutingAgreement], str]:
    """Selections compared in call order, each as a set along its last axis; (None, why) when they do not pair."""
    shapes = [tuple(g.shape) for g in graph], [tuple(e.shape) for e in eager]
    if shapes[0] != shapes[1]:
        return None, (f"not compared: the graph makes {len(graph)} routing selections of shapes {shapes[0][:4]}, "
                      f"eager {len(eager)} of shapes {shapes[1][:4]}")
    agreed = sum(int((g[..., :, None] == e.cpu().numpy()[..., None, :]).any(-1).sum()) for g, e in zip(graph, eager))
    return RoutingAgreement(len(graph), sum(g.size for g in graph), agreed), ""


def compare(name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> OutputParity:
    """The error measures of the module docstring for one output."""
    if got.shape != want.shape:
        raise ValueError(f"check_parity: output {name!r} has shape {got.shape} in the runtime but {want.shape} "
                         "in eager PyTorch; the export does not compute the same function.")
    a, b = got.astype(np.float64), want.astype(np.float64)
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    cosine = float(np.dot(a.ravel(), b.ravel()) / norms) if norms > 0 else float(np.array_equal(a, b))
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean()) if a.ndim >= 2 and a.size else None
    return OutputParity(name, tuple(got.shape), max_abs, max_abs / scale if scale > 0 else max_abs, cosine, top1,
                        tolerance, scale)


def scaled_bound(tolerance: float, scale: float) -> float:
    """tolerance * max(1, scale): absolute for outputs of magnitude up to 1, relative beyond."""
    return tolerance * max(1.0, scale)


@dataclass
class GenerationParity:
    """check_generation's findings over every prompt and step."""

    directory: str
    dtype: str
    tolerance: float
    steps: int  # decode steps per prompt (greedy tokens compared)
    prompts: int
    max_abs: float = 0.0  # over every step's logits
    max_rel: float = 0.0
    bound: float = 0.0  # the largest max_abs that passes (scaled_bound over the logits' scale)
    token_agreement: float = 1.0  # share of steps whose greedy token equals eager's
    mismatches: list[dict[str, Any]] = field(default_factory=list)  # prompt, step, eager, onnx, eager's top-2 gap
    runtime: str = "ONNX Runtime (CPU)"
    routing: Optional[RoutingAgreement] = None  # every step's routing choices (prefill: every prompt token)
    routing_note: str = ""

    @property
    def near_ties(self) -> int:
        """Greedy mismatches where eager's two best logits are within the bound: a rounding can flip them."""
        return sum(m["eager_top2_gap"] <= self.bound for m in self.mismatches)

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.bound and self.near_ties == len(self.mismatches)

    def to_dict(self) -> dict[str, Any]:
        routing = None if self.routing is None else dict(asdict(self.routing), share=self.routing.share)
        return {**asdict(self), "routing": routing, "near_ties": self.near_ties, "passed": self.passed}

    def table(self) -> str:
        rows = [("prompts", "steps", "max abs", "max rel", "bound", "greedy = eager", "near ties", "result"),
                (str(self.prompts), str(self.steps), f"{self.max_abs:.3g}", f"{self.max_rel:.3g}", f"{self.bound:.3g}",
                 f"{self.token_agreement:.2%}", str(self.near_ties), "PASS" if self.passed else "FAIL")]
        text = format_table(rows, f"generation parity: {self.directory} in {self.runtime} vs eager PyTorch, "
                                  f"dtype={self.dtype} (prefill + decode steps through the KV cache, "
                                  "teacher-forced on eager's greedy tokens)")
        return text + _routing_line(self.routing, self.routing_note)

    def __str__(self) -> str:
        return self.table()


def check_generation(model: nn.Module, directory: Union[str, os.PathLike], prompts: Inputs, steps: int = 32, *,
                     tolerance: Optional[float] = None) -> GenerationParity:
    """The exported decoder in `directory` against `model` (eager, full recompute, no cache) on `prompts` (token ids
    [n, s], or a list of token-id lists): eager greedy-decodes `steps` tokens; the decoder runs the prompt (past
    length 0), then one cached step per eager token. Every step's logits must be within the scaled bound, and its
    greedy token equal eager's unless eager's two best logits are within that bound (a near tie, reported)."""
    from .generate import Generator

    generator = Generator(directory, routing=True)
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    elif isinstance(prompts, tuple) and len(prompts) == 1 and isinstance(prompts[0], torch.Tensor):
        prompts = prompts[0].tolist()
    tolerance = tolerance if tolerance is not None else TOLERANCES[getattr(torch, generator.metadata["dtype"])]
    report = GenerationParity(os.fspath(directory), generator.metadata["dtype"], tolerance, steps, len(prompts))
    errors, scale, agreed = [], 0.0, 0
    graph_choices, eager_choices = [], []
    was_training = model.training
    model.eval()
    try:
        for index, prompt in enumerate(prompts):
            eager, eager_steps = _eager_greedy(model, list(prompt), steps)  # [steps, vocab], choices per step
            tokens = eager.argmax(-1)
            got, graph_steps = generator.teacher_forced(prompt, tokens[:-1].tolist())
            got = got.astype(np.float64)
            for step, (graph_step, eager_step) in enumerate(zip(graph_steps, eager_steps)):
                graph_choices += graph_step  # a decode step routes the new token: eager's last row
                eager_choices += eager_step if step == 0 else [choices[-1:] for choices in eager_step]
            errors.append(float(np.abs(got - eager).max()))
            scale = max(scale, float(np.abs(eager).max()))
            for step, (want_token, got_token) in enumerate(zip(tokens, got.argmax(-1))):
                if want_token == got_token:
                    agreed += 1
                    continue
                top2 = np.sort(eager[step])[-2:]
                report.mismatches.append({"prompt": index, "step": step, "eager": int(want_token),
                                          "onnx": int(got_token), "eager_top2_gap": float(top2[1] - top2[0])})
    finally:
        model.train(was_training)
    report.max_abs = max(errors)
    report.max_rel = report.max_abs / scale if scale > 0 else report.max_abs
    report.bound = scaled_bound(tolerance, scale)
    report.token_agreement = agreed / (steps * len(prompts))
    if generator.selections:
        report.routing, report.routing_note = routing_agreement(graph_choices, eager_choices)
    else:
        report.routing_note = "no routing selection in the file (no MoE layer, or com.microsoft.MoE routes inside)"
    return report


def _eager_greedy(model: nn.Module, prompt: list[int], steps: int) -> tuple[np.ndarray, list[list[torch.Tensor]]]:
    """Eager logits [steps, vocab] of greedy decoding, each step a full forward over the sequence so far, and each
    step's routing choices (token choice: [tokens, k] per router call)."""
    sequence, rows, choices = torch.tensor([prompt]), [], []
    hooks = [m.register_forward_hook(lambda module, args, out: choices[-1].append(out.dispatch.choices))
             for m in model.modules() if isinstance(m, Router)]
    try:
        with torch.no_grad():
            for _ in range(steps):
                choices.append([])
                last = ModelCall(model).named(as_model_inputs((sequence,), "check_generation"))["logits"][0, -1]
                rows.append(last.double())
                sequence = torch.cat([sequence, last.argmax().view(1, 1)], dim=1)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(rows).cpu().numpy(), choices
