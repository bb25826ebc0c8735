"""Per-layer sparsity for a real pretrained LLM: `moe_compile.optimize` on Gemma 3 270M, against uniform splits.

    python examples/gemma3_optimize.py --budget 0.5          # needs the `gguf` extra (and `plot` for the PNG)
    python examples/gemma3_optimize.py --cost latency --budget 2/8 --candidates 2/8 3/16 4/16 5/16

optimize converts Gemma 3 270M once per candidate (k of E split experts active for each --candidates k/E, calibrated
with the defaults on 64 windows of 256 tokens of training prose, every token in each layer's sample), measures each
candidate on every layer on 16 windows spread over the other half of the training prose and as much training code,
and around the best of them within the --budget of active FFN (or of FFN latency, --cost latency; or a candidate
"k/E": its cost on every layer, measured in the same run) each layer's change of the divergence from dense when it
alone takes another choice (dense or a candidate); then chooses per layer at the least predicted divergence. The
plan and every uniform split within the budget (converted again with the same calibration, cached) are measured on
held-out prose (standard-library docstrings) and code (standard-library source), up to 64 windows of 256 tokens
spread over each (all 12,800 of the prose, 16,384 of the code's 54k), BOS first, beside the dense model; and the
transformer body of each (no LM head: the FFNs are about a quarter of the whole model's FLOPs) is exported (target
portable) and timed in ONNX Runtime on a 512-token prompt, 1 thread, in round-robin blocks. Writes
docs/gemma3_optimize.json, .md and .png (gemma3_optimize_latency.* for a latency budget, or --out), with the plan's
change of held-out loss from the best uniform split window by window (--paired adds it to a saved run); keeps the
plan and the uniform models in the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
import torch.nn.functional as F

import moe_compile as mc
from moe_compile.example_text import (calibration_batches, scored_windows, stdlib_prose, stdlib_text, token_ids,
                                      window_logits)
from moe_compile.optimize import optimize
from moe_compile.table import format_table
from moe_compile.timing import ort_session, time_round_robin

from gemma3 import CACHE, fetch, load  # examples/gemma3.py, beside this script

DOCS = Path(__file__).resolve().parent.parent / "docs"
SAVED = CACHE.parent / "gemma3-optimize"  # the plans and uniform splits converted
LENGTH, EVAL_WINDOWS, SENSITIVITY_WINDOWS = 256, 64, 16
PROMPT = 512  # tokens of the timed prompt


def body_latency(models: dict, workdir: Path) -> dict:
    """Seconds per 512-token forward of each model's transformer body (no LM head) in ONNX Runtime, 1 thread."""
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    calls = {}
    for name, model in models.items():
        path = workdir / f"{len(calls)}.onnx"
        mc.export(model.model, (ids,), path)
        session = ort_session(path, 1)
        calls[name] = lambda session=session: session.run(None, {session.get_inputs()[0].name: ids.numpy()})
    return time_round_robin(calls, blocks=5, per_block=2)


def held_out_texts(tokenizer) -> dict:
    """{text: token ids} of the held-out prose (standard-library docstrings) and code (standard-library source)."""
    return {"prose": token_ids(stdlib_prose("validation"), tokenizer),
            "code": token_ids(stdlib_text("validation"), tokenizer)}


def window_losses(model, texts: dict, bos: int) -> dict:
    """{text: the model's mean next-token cross-entropy on each held-out window [windows]}: up to EVAL_WINDOWS of
    LENGTH tokens spread over the text, BOS first (perplexity = exp of their mean: the windows are equally long)."""
    losses = {}
    for name, ids in texts.items():
        inputs, targets = scored_windows(ids, LENGTH, EVAL_WINDOWS, bos, spread=True)
        losses[name] = torch.cat([F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").mean(1)
                                  for logits, y in window_logits(model, inputs, targets, bos is not None)])
    return losses


def paired(plan: dict, uniform: dict) -> dict:
    """Per text, the plan's change of held-out loss from the uniform split's, window by window over the same
    windows: mean and standard error (nats), and in how many windows it is lower."""
    changes = {text: plan[text] - uniform[text] for text in plan}
    return {text: {"change": d.mean().item(), "error": (d.std() / math.sqrt(len(d))).item(),
                   "lower": int((d < 0).sum()), "windows": len(d)} for text, d in changes.items()}


def run(args: argparse.Namespace) -> dict:
    dense, tokenizer = load(fetch())
    bos = tokenizer.bos_token_id
    prose = token_ids(stdlib_prose("train"), tokenizer)
    calibration_part, other_prose = prose[:len(prose) // 2], prose[len(prose) // 2:]
    code = token_ids(stdlib_text("train"), tokenizer)
    sensitivity_part = torch.cat([other_prose, code[:len(other_prose)]])  # half prose, half code
    calibration = calibration_batches(LENGTH, args.calibration_windows, batch_size=4, data=calibration_part, bos=bos)
    sample = args.calibration_windows * LENGTH  # every calibration token in each site's sample (distillation overfits
    #                                             a small one: 4,096 tokens measured 1.52x dense at 8/4, 16,384 1.35x)
    held_out = held_out_texts(tokenizer)
    candidates = [split(label, sample) for label in args.candidates]
    start = time.perf_counter()
    moe, report = optimize(dense, calibration, sensitivity_part, budget=args.budget, candidates=candidates,
                           length=LENGTH, windows=SENSITIVITY_WINDOWS, bos=bos, cost=args.cost,
                           latency_tokens=PROMPT)
    optimize_s = time.perf_counter() - start
    print(report, flush=True)
    fitting = [u["choice"] for u in report.uniform if u["cost"] <= report.budget + 1e-9]
    if not fitting:
        raise SystemExit("no uniform split fits the budget: there is nothing to compare the plan with")
    models = {"dense": (dense, None)}
    for label in fitting:  # every uniform split within the budget, the best of them (the anchor) among them
        models[f"uniform split {label}"] = uniform(dense, label, sample, calibration)
    mc.save(moe, SAVED / args.out)
    plan_name = f"optimize, {args.cost} budget {budget_label(report)}"
    models[plan_name] = (moe, optimize_s)
    with tempfile.TemporaryDirectory() as workdir:
        latency = body_latency({name: model for name, (model, _) in models.items()}, Path(workdir))
    losses = {name: window_losses(model, held_out, bos) for name, (model, _) in models.items()}
    rows = [{"model": name, "active": 1.0 if model is dense else mc.model_stats(model).active_fraction,
             "seconds": seconds, "body_ms": 1000 * latency[name],
             **{text: math.exp(loss.mean()) for text, loss in losses[name].items()}}
            for name, (model, seconds) in models.items()]
    result = {"command": " ".join(sys.argv[1:]), "budget": args.budget, "cost": args.cost,
              "candidates": args.candidates, "calibration_tokens": sample,
              "eval_tokens": {name: scored_windows(ids, LENGTH, EVAL_WINDOWS)[1].numel()
                              for name, ids in held_out.items()},
              "rows": rows, "paired": paired(losses[plan_name], losses[f"uniform split {anchor_label(report.anchor)}"]),
              "report": report.to_dict(), "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "machine": {"threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}}
    (DOCS / f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    report.plot(DOCS / f"{args.out}.png")
    return result


def split(label: str, sample: int) -> mc.MoEConfig:
    """The calibrated split config "k/E": k of E experts active, `sample` calibration tokens in each site's sample."""
    k, experts = map(int, label.split("/"))
    return mc.MoEConfig(experts="split", num_experts=experts, top_k=k, calibration_tokens=sample)


def uniform(dense, label: str, sample: int, calibration: list) -> tuple:
    """Uniform split `label` of Gemma, converted with the same calibration as optimize's candidates, and the seconds
    its conversion took; cached by label (conversion is deterministic: the cached model is the one this run would
    convert), seconds None when loaded from the cache."""
    path = uniform_path(label, sample)
    if path.exists():
        return mc.load(path), None
    start = time.perf_counter()
    model = mc.convert(dense, split(label, sample), calibration_data=calibration, progress=False)
    seconds = time.perf_counter() - start
    mc.save(model, path)
    return model, seconds


def uniform_path(label: str, sample: int) -> Path:
    return SAVED / f"uniform-{label.replace('/', '-of-')}-{sample}"


def anchor_label(anchor: str) -> str:
    """optimize's anchor "uniform k/E" (the best uniform split within the budget) as "k/E"."""
    return anchor.removeprefix("uniform ")


def add_paired(result: dict, out: str) -> dict:
    """A saved run's plan against its best uniform split, window by window: both from the cache."""
    _, tokenizer = load(fetch())
    held_out = held_out_texts(tokenizer)
    uniform_model = mc.load(uniform_path(anchor_label(result["report"]["anchor"]), result["calibration_tokens"]))
    result["paired"] = paired(window_losses(mc.load(SAVED / out), held_out, tokenizer.bos_token_id),
                              window_losses(uniform_model, held_out, tokenizer.bos_token_id))
    (DOCS / f"{out}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def budget_label(report) -> str:
    return f"{report.budget:.1%}" + (f" (uniform {report.budget_of.replace('/', ' of ')})" if report.budget_of else "")


def converted(row: dict, dense: dict) -> str:
    """The row's conversion time: "-" for dense, "cached" for a uniform split loaded from the cache."""
    return "-" if row is dense else "cached" if row["seconds"] is None else f"{row['seconds'] / 60:.1f} min"


def write_doc(result: dict, out: str) -> str:
    rows, report, cost = result["rows"], result["report"], result.get("cost", "flops")
    latency = cost == "latency"
    dense = rows[0]
    table = [("model", "active FFN", "convert", "prose ppl", "vs dense", "code ppl", "vs dense", "body, 512 tokens",
              "vs dense")]
    table += [(r["model"], f"{r['active']:.1%}", converted(r, rows[0]),
               f"{r['prose']:.2f}", f"{r['prose'] / dense['prose']:.2f}x", f"{r['code']:.2f}",
               f"{r['code'] / dense['code']:.2f}x", f"{r['body_ms']:.0f} ms", f"{r['body_ms'] / dense['body_ms']:.2f}x")
              for r in rows]
    choices = list(report["plan"][0]["changes"])
    plan = [("layer", "plan", *choices)]
    plan += [(p["site"], p["choice"], *(f"{p['changes'][c]:+.4f}" + (f"±{p['errors'][c]:.4f}" if "errors" in p else "")
                                        for c in choices)) for p in report["plan"]]  # older results have no errors
    sensitivity = [("model", "active FFN", *(("FFN latency",) * latency), "divergence", "perplexity", "vs dense")]
    sensitivity += [(f"uniform {u['choice']}", f"{u['active']:.1%}", *([f"{u['cost']:.1%}"] if latency else []),
                     f"{u['divergence']:.4f}", f"{u['perplexity']:.2f}",
                     f"{u['perplexity'] / report['dense_perplexity']:.2f}x") for u in report["uniform"]]
    plan_cost = [f"{report['predicted_cost']:.1%}"] if latency else []
    sensitivity += [(f"plan ({label})", f"{report['active']:.1%}", *plan_cost, divergence,
                     f"{report[key]:.2f}", f"{report[key] / report['dense_perplexity']:.2f}x")
                    for label, key, divergence in (("predicted", "predicted_perplexity", ""),
                                                   ("measured", "perplexity", f"{report['divergence']:.4f}"))]
    timed = "" if not latency else "\n\nThe layer latencies the plan was costed with (ONNX Runtime, portable, " \
        f"1 thread, {PROMPT} tokens):\n\n```\n" + format_table(
            [("layer shape", "choice", "ms")] + [(shape, choice, f"{t:.2f}") for shape, ms in
                                                 report["latency_ms"].items() for choice, t in ms.items()]) + "\n```"
    machine = result["machine"]
    errors = ", ± its standard error over the sensitivity windows" if "errors" in report["plan"][0] else ""
    ort = f", onnxruntime {machine['onnxruntime']}" if "onnxruntime" in machine else ""  # older results have none
    cross_fit = "" if "cross_fitted_change" not in report else (  # runs before the cross-fit had none
        f"\nPlans chosen on half the sensitivity windows (even or odd), their predicted change on the other half: "
        f"{report['cross_fitted_change']:+.4f} nats from the anchor"
        + (": no gain, so the plan is the anchor.\n" if report["anchor_kept"] else ".\n"))
    held_out = ("8 windows of 256 tokens each, from the start of each text" if "eval_tokens" not in result else
                ", ".join(f"{tokens:,} tokens of {name}" for name, tokens in result["eval_tokens"].items())
                + "; windows of 256 tokens spread over each text")  # runs before 64 spread windows took 8
    pairs = "" if "paired" not in result else (  # runs before it had none
        f"\nThe plan against uniform {anchor_label(report['anchor'])}, window by window over the same held-out windows "
        "(change of loss, nats per token, ± its standard error): " + "; ".join(
            f"{text} {p['change']:+.4f} ± {p['error']:.4f}, lower in {p['lower']} of {p['windows']} windows"
            for text, p in result["paired"].items()) + ".\n")
    calibrated = result.get("calibration_tokens", 16 * LENGTH)  # runs before --calibration-windows took 16 windows
    text = f"""# Per-layer sparsity for Gemma 3 270M (`optimize`, {"latency" if latency else "FLOP"} budget)

```
python examples/gemma3_optimize.py {result['command']}
```

{machine['threads']} threads, torch {machine['torch']}{ort}; peak memory {result['peak_memory_mb'] / 1024:.1f} GiB.
Candidates: split experts k of E active for k/E in {', '.join(result['candidates'])} (calibrated defaults,
{calibrated:,} tokens of training prose, all in each layer's sample), or dense; the budget a share of the dense FFN's
{"ONNX Runtime latency" if latency else "FLOPs"}.
Sensitivity measured on {SENSITIVITY_WINDOWS} windows of 256 tokens spread over other training
prose and as much training code; the results below on held-out prose and code ({held_out}), BOS first.
Body:
the transformer without its LM head, exported (target portable), one {PROMPT}-token prompt in ONNX Runtime, 1 thread,
median of 5 round-robin blocks.

```
{format_table(table)}
```
{pairs}
The plan, and each choice's change of the divergence from dense (KL over dense's 256 likeliest tokens, nats per
token) at each layer when it alone changes from {report['anchor']}{errors}:

```
{format_table(plan)}
```
{cross_fit}

On the sensitivity windows (where the plan was chosen, so its figure there is optimistic; divergence from dense in
nats per token):

```
{format_table(sensitivity)}
```{timed}

![frontier]({out}.png)
"""
    (DOCS / f"{out}.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=lambda text: text if "/" in text else float(text), default=0.5,
                        help="share of the dense FFN cost, or a candidate k/E: its cost on every layer (0.5)")
    parser.add_argument("--cost", choices=["flops", "latency"], default="flops",
                        help="the budget's cost: FFN FLOPs, or FFN latency in ONNX Runtime (flops)")
    parser.add_argument("--candidates", nargs="+", default=["2/8", "4/8", "6/8"],
                        help="candidate splits k/E, k of E experts active (2/8 4/8 6/8)")
    parser.add_argument("--calibration-windows", type=int, default=64,
                        help="windows of 256 tokens of training prose to calibrate on (64)")
    parser.add_argument("--out", help="name of the result files in docs/ (gemma3_optimize, with --cost latency "
                        "gemma3_optimize_latency)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the doc from the saved result")
    parser.add_argument("--paired", action="store_true", help="add to the saved result the plan's change from the "
                        "best uniform split window by window (both models from the cache), and rewrite the doc")
    args = parser.parse_args()
    args.out = args.out or f"gemma3_optimize{'' if args.cost == 'flops' else '_' + args.cost}"
    saved = DOCS / f"{args.out}.json"
    result = json.loads(saved.read_text()) if args.report_only or args.paired else run(args)
    if args.paired:
        result = add_paired(result, args.out)
    print(write_doc(result, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
