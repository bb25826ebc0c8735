"""Healing a real pretrained LLM: Gemma 3 270M split into experts, then trained end to end to the dense model.

    python examples/gemma3_healing.py --tokens 102400               # needs the `gguf` extra (and `plot` for the PNG)
    python examples/gemma3_healing.py --tokens 245760 --fractions 0.5 --skip-baseline    # a longer run, at 50%
    python examples/gemma3_healing.py --tokens 102400 --fractions   # the pruned baseline alone, added to its run
    python examples/gemma3_healing.py --tokens 102400 --fractions 0.5 --skip-baseline \
        --plan ~/.cache/moe_compile/gemma3-optimize/plan                # an optimize plan beside uniform 8/4
    python examples/gemma3_healing.py --report-only                 # rewrite the docs from the saved results

Per active FFN fraction F (k = F * 8 of 8 split experts, calibrated with the defaults on 4,096 tokens of prose):
perplexity of the converted model on held-out English prose (standard-library docstrings, 8 windows of 256 tokens,
BOS first) and on held-out code (standard-library source), then `moe_compile.heal` (its default loss: KL of the
logits at 64 sampled positions per window plus every block's output) on --tokens tokens of the training prose and
as much training code, with the held-out prose perplexity measured along the way. The baseline at F = 50%: the
dense MLPs pruned in width to as many neurons (the half with the largest mean contribution on the calibration
batches, as smaller Linear layers), their weights healed with the same budget. --plan: saved converted models
(examples/gemma3_optimize.py writes its per-layer plan) healed the same way. Dense is measured in every run.
Writes docs/gemma3_healing_<tokens>.json (a later run with the same --tokens adds or replaces its rows), then
docs/gemma3_healing.md and .png from every run's result present.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import moe_compile as mc
from moe_compile.evaluate import shared_label
from moe_compile.example_text import calibration_batches, perplexity, stdlib_prose, stdlib_text, token_ids
from moe_compile.heal import heal
from moe_compile.table import format_table

from gemma3 import fetch, load  # examples/gemma3.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
DOC, PLOT = ROOT / "docs" / "gemma3_healing.md", ROOT / "docs" / "gemma3_healing.png"  # from every run's result
LENGTH, EVAL_WINDOWS, CALIBRATION_WINDOWS = 256, 8, 16
TARGET = 1.15  # the perplexity ratio the healing budget is extrapolated to
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def result_path(tokens: int) -> Path:
    return ROOT / "docs" / f"gemma3_healing_{tokens}.json"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def pruned(dense, calibration: list[torch.Tensor], keep: float) -> tuple[torch.nn.Module, list[str]]:
    """A copy of `dense` whose gated MLPs (gate_proj, up_proj, down_proj) keep the `keep` share of their neurons
    with the largest mean contribution |h_i| ||W_down[:, i]|| on the calibration batches (the ranking behind split
    experts' shared neurons), as smaller Linear layers; and the MLPs' parameter-name prefixes, to heal."""
    model = copy.deepcopy(dense)
    mlps = {name: m for name, m in model.named_modules() if all(hasattr(m, p) for p in PROJECTIONS)}
    mass = {name: 0.0 for name in mlps}
    hooks = [m.down_proj.register_forward_pre_hook(
        lambda module, args, name=name: mass.__setitem__(name, mass[name] + args[0].abs().flatten(0, 1).sum(0)))
        for name, m in mlps.items()]
    for batch in calibration:
        model(batch)
    for hook in hooks:
        hook.remove()
    for name, mlp in mlps.items():
        score = mass[name] * mlp.down_proj.weight.norm(dim=0)
        neurons = score.topk(int(keep * len(score))).indices.sort().values
        for projection in ("gate_proj", "up_proj"):
            old = getattr(mlp, projection)
            setattr(mlp, projection, torch.nn.Linear(old.in_features, len(neurons), bias=False))
            getattr(mlp, projection).weight.copy_(old.weight[neurons])
        old = mlp.down_proj
        mlp.down_proj = torch.nn.Linear(len(neurons), old.out_features, bias=False)
        mlp.down_proj.weight.copy_(old.weight[:, neurons])
    return model, [f"{name}." for name in mlps]


def measure(model, texts: dict, bos: int) -> dict:
    return {name: perplexity(model, ids, length=LENGTH, max_windows=EVAL_WINDOWS, bos=bos)
            for name, ids in texts.items()}


def run(args: argparse.Namespace) -> dict:
    dense, tokenizer = load(fetch())
    bos = tokenizer.bos_token_id
    prose = token_ids(stdlib_prose("train"), tokenizer)
    train = torch.cat([prose, token_ids(stdlib_text("train"), tokenizer)[:len(prose)]])
    held_out = {"prose": token_ids(stdlib_prose("validation"), tokenizer),
                "code": token_ids(stdlib_text("validation"), tokenizer)}
    calibration = calibration_batches(LENGTH, CALIBRATION_WINDOWS, batch_size=4, data=prose, bos=bos)
    path = result_path(args.tokens)
    earlier = json.loads(path.read_text()) if path.is_file() else {"commands": [], "rows": []}
    result = {"commands": earlier["commands"] + [" ".join(sys.argv[1:])], "tokens": args.tokens, "lr": args.lr,
              "length": LENGTH,              "eval_windows": EVAL_WINDOWS, "training_tokens_available": len(train),
              "dense": measure(dense, held_out, bos), "rows": earlier["rows"],
              "machine": {"threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__}}
    print(f"dense: {result['dense']}", flush=True)
    plans = [(f"split 8/{round(8 * f)}", f) for f in args.fractions] + ([] if args.skip_baseline else
                                                                         [("pruned to 50%", 0.5)])
    plans += [(f"optimize plan ({Path(directory).name})", directory) for directory in args.plan]
    for name, fraction in plans:
        start = time.perf_counter()
        if name.startswith("optimize"):
            moe, fields, trained = mc.load(fraction), {"plan": str(fraction)}, "moe"
            active = mc.model_stats(moe).active_fraction
        elif name.startswith("pruned"):
            moe, trained = pruned(dense, calibration, fraction)
            fields, active = {"keep": fraction}, fraction
        else:
            fields, trained = dict(num_experts=8, top_k=round(8 * fraction)), "moe"
            moe = mc.convert(dense, mc.MoEConfig(experts="split", **fields), calibration_data=calibration,
                             progress=False)
            active, fields["shared_experts"] = mc.model_stats(moe).active_fraction, moe.moe_report.config.shared_experts
            per_site = [moe.moe_report.config_of(site.name).shared_experts for site in moe.moe_report.converted]
            name = f"{name}, {shared_label({'shared_per_site': per_site})} shared"  # each layer chose its own
        row = {"model": name, "active": active, "config": fields, "convert_s": time.perf_counter() - start,
               "before": measure(moe, held_out, bos)}
        print(f"{name}: before healing {row['before']} ({row['convert_s']:.0f} s)", flush=True)
        report = heal(moe, dense, train, tokens=args.tokens, length=LENGTH, batch_size=4, lr=args.lr, bos=bos,
                      train=trained, eval_data=held_out["prose"], eval_every=max(args.tokens // 8, 1),
                      eval_windows=EVAL_WINDOWS)
        row.update(after=measure(moe, held_out, bos), heal_s=report.seconds, heal_tokens=report.tokens,
                   curve=report.curve, losses=report.losses[::10], peak_memory_mb=peak_mb())
        print(f"{name}: after healing {row['after']} ({row['heal_s']:.0f} s)", flush=True)
        result["rows"] = [r for r in result["rows"] if r["model"] != name] + [row]  # a rerun replaces its row
        path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def section(result: dict) -> str:
    """One run's tables: perplexity before and after healing, and the curve while healing."""
    dense = result["dense"]
    lines = [("model", "active FFN", "convert", "healing", "prose ppl", "vs dense", "code ppl", "vs dense"),
             ("dense", "100%", "-", "-", f"{dense['prose']:.2f}", "1.00x", f"{dense['code']:.2f}", "1.00x")]
    for row in result["rows"]:
        for stage in ("before", "after"):
            ppl = row[stage]
            healing = "-" if stage == "before" else f"{row['heal_tokens']:,} tokens, {row['heal_s'] / 60:.1f} min"
            lines.append((f"{row['model']} ({'calibrated' if stage == 'before' else 'healed'})",
                          f"{row['active']:.0%}", "-" if "plan" in row["config"] else f"{row['convert_s']:.0f} s",
                          healing,
                          f"{ppl['prose']:.2f}", f"{ppl['prose'] / dense['prose']:.2f}x",
                          f"{ppl['code']:.2f}", f"{ppl['code'] / dense['code']:.2f}x"))
    curve = [("tokens", *(row["model"] for row in result["rows"]))]
    for i, (tokens, _) in enumerate(result["rows"][0]["curve"]):
        curve.append((f"{tokens:,}", *(f"{row['curve'][i][1] / dense['prose']:.3f}x" if i < len(row["curve"])
                                       else "-" for row in result["rows"])))
    peak = max(row["peak_memory_mb"] for row in result["rows"]) / 1024
    commands = "\n".join(f"python examples/gemma3_healing.py {command}" for command in result["commands"])
    return f"""## {result['tokens']:,} healing tokens per model

```
{commands}
```

{result['machine']['threads']} threads, torch {result['machine']['torch']}; peak memory of the run {peak:.1f} GiB.

```
{format_table(lines)}
```

Held-out prose perplexity against dense while healing:

```
{format_table(curve)}
```
"""


def extrapolated(results: list[dict], target: float = TARGET) -> dict[str, tuple[float, list]]:
    """Per configuration (row["config"]) healed to the end in runs of two or more lengths T: the T at which the
    power law ratio - 1 = A T^-alpha through their final held-out prose ratios reaches `target` (an
    extrapolation), and the points it was fitted to; keyed by the rows' names."""
    names: dict[str, list[str]] = {}
    finals: dict[str, list[tuple[int, float]]] = {}
    for result in results:
        for row in result["rows"]:
            key = json.dumps(row["config"], sort_keys=True)
            names.setdefault(key, []).append(row["model"])
            finals.setdefault(key, []).append((row["heal_tokens"], row["after"]["prose"] / result["dense"]["prose"]))
    fitted = {}
    for key, points in finals.items():
        model = " / ".join(dict.fromkeys(names[key]))
        if len({tokens for tokens, _ in points}) < 2 or min(ratio for _, ratio in points) <= target:
            continue
        slope, intercept = np.polyfit(np.log([t for t, _ in points]), np.log([r - 1 for _, r in points]), 1)
        if slope < 0:
            fitted[model] = (float(np.exp((np.log(target - 1) - intercept) / slope)), sorted(points))
    return fitted


def report(results: list[dict]) -> None:
    """docs/gemma3_healing.md (a section per run, fewest tokens first) and the PNG of every run's curve."""
    sections = [section(result) for result in results]
    fits = extrapolated(results)
    if fits:
        sections.append(f"## Extrapolated: the tokens to {TARGET:.2f}x (not measured)\n\nA power law ratio - 1 = A "
                        "T^-alpha through the final held-out prose ratios of the runs of different lengths T (two "
                        "points fix it exactly; healing curves flatten, so read these as lower bounds):\n\n```\n" +
                        format_table([("model", "final points (tokens: ratio)", f"tokens to {TARGET:.2f}x")] + [
                            (model, ", ".join(f"{t:,}: {r:.3f}x" for t, r in points), f"{tokens:,.0f}")
                            for model, (tokens, points) in fits.items()]) + "\n```\n")
    print("\n".join(sections))
    DOC.write_text(f"""# Healing Gemma 3 270M

Perplexity on {results[0]['eval_windows']} held-out windows of {results[0]['length']} tokens (BOS first) of English
prose (standard-library docstrings) and of code (standard-library source), on this 2-core machine. Calibration on
4,096 tokens of training prose with the calibrated defaults; healing with `moe_compile.heal` (its default loss:
the KL of the logits at 64 sampled positions per window plus every block's output; the MoE layers trained; AdamW,
warm-up then cosine decay) on windows of the training prose and as much training code
({results[0]['training_tokens_available']:,} tokens). The pruned baseline runs as many neurons per token as split
8/4: the half of each MLP's neurons with the largest mean contribution |h_i| ||W_down[:, i]|| on the calibration
batches, always; healing trains its MLPs. Every ratio is against the dense model measured in the same run.

{chr(10).join(sections)}
![perplexity while healing](gemma3_healing.png)
""")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (extra `plot`): no PNG", file=sys.stderr)
        return
    figure, axis = plt.subplots(figsize=(12, 5))
    for result in results:
        for row in result["rows"]:
            axis.plot([t for t, _ in row["curve"]], [p / result["dense"]["prose"] for _, p in row["curve"]],
                      marker="o", markersize=3,
                      label=f"{row['model']} ({row['active']:.0%} active), {result['tokens']:,}-token run")
    for model, (tokens, points) in fits.items():
        axis.plot([points[-1][0], tokens], [points[-1][1], TARGET], linestyle="--", marker="o", markerfacecolor="none",
                  label=f"{model}: extrapolated to {TARGET:.2f}x (not measured)")
    axis.axhline(1.0, color="gray", linestyle=":", label="dense")
    axis.set_xscale("symlog", linthresh=10_000)  # 0 (before healing) to the extrapolations
    axis.set_xlim(left=0)
    axis.set_xlabel("healing tokens (linear below 10,000, then logarithmic)")
    axis.set_ylabel("held-out prose perplexity / dense")
    axis.set_title("Gemma 3 270M: healing split experts, and a pruned baseline")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="healing tokens per model (100000)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (1e-4)")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.5, 0.25],
                        help="active FFN fractions of the split models (none: the baseline alone)")
    parser.add_argument("--skip-baseline", action="store_true", help="leave out the pruned baseline")
    parser.add_argument("--plan", nargs="*", default=[], metavar="DIR",
                        help="saved converted models to heal as well (e.g. examples/gemma3_optimize.py's plan)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs from the saved JSON")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    if not args.report_only:
        run(args)
    report(sorted((json.loads(path.read_text()) for path in DOC.parent.glob("gemma3_healing_*.json")),
                  key=lambda result: result["tokens"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
