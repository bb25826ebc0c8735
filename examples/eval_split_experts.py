"""Split experts on real trained GPTs: validation perplexity, dense vs MoE, per method and active FFN fraction.

    python examples/eval_split_experts.py                      # every checkpoint, every table (~40 min)
    python examples/eval_split_experts.py --only relu --sections curve
    python examples/eval_split_experts.py --report-only        # rewrite the docs from the saved results

`moe-compile eval` measures one conversion the same way (moe_compile.evaluate) on any checkpoint.

Checkpoints: examples/checkpoints/tiny_gpt_{relu,gelu,swiglu}.safetensors (examples/train_tiny_gpts.py).
Calibration: 64 windows of 128 bytes from the training files (8,192 tokens); perplexity on 128 windows of 128
bytes of the validation files (moe_compile.example_text). Every MoE runs top-k of E experts with
token_choice routing, so each token runs k/E of the FFN neurons (shared ones included) at every row.
Tables: the perplexity curve of three methods at 12.5-75% active; the ablation (each calibrated part added in
turn, E = 8, 32, 64 at 25% and 50%); the sweep over shared neuron groups (the default, shared_experts='auto',
chooses s per layer among 0, k/4, k/2 and 3k/4 by the calibrated layer's held-out error; "a-b": the layers
chose from a to b).

Writes benchmarks/results/split_experts_<variant>.json, then docs/split_experts.md (tables) and
docs/split_experts.png (plot; needs matplotlib, the `plot` extra) from every variant's results present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Iterator, Sequence

import torch

from moe_compile.evaluate import evaluate_split, shared_label
from moe_compile.example_models import load_checkpoint
from moe_compile.example_text import calibration_batches, perplexity, stdlib_bytes
from moe_compile.table import format_table

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "examples" / "checkpoints"
RESULTS = ROOT / "benchmarks" / "results"  # split_experts_<variant>.json
DOC, PLOT = ROOT / "docs" / "split_experts.md", ROOT / "docs" / "split_experts.png"
VARIANTS = ("relu", "gelu", "swiglu")
EVAL_WINDOWS = 128

DATA_FREE = dict(split_strategy="kmeans", router_init="centroid", shared_experts=0, compensate=False, distill_steps=0)
# the ablation: each step adds one part to the previous one (at equal active fraction k / E)
ABLATION = (
    ("data-free split (k-means, centroid router)", DATA_FREE, False),
    ("+ calibrated router", dict(DATA_FREE, router_init="calibrated"), True),
    ("+ co-activation clusters", dict(DATA_FREE, router_init="calibrated", split_strategy="coactivation"), True),
    ("+ shared neurons", dict(split_strategy="coactivation", router_init="calibrated", compensate=False,
                              distill_steps=0), True),
    ("+ compensation", dict(distill_steps=0), True),
    ("+ distillation", dict(), True),
)
ABLATION_EXPERTS = (8, 32, 64)
ABLATION_FRACTIONS = (0.25, 0.5)
CURVE_EXPERTS = 32
CURVE_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
CURVE_METHODS = (("data-free (k-means, centroid)", DATA_FREE, False),
                 ("calibrated, training-free", dict(distill_steps=0), True),
                 ("calibrated + distillation", dict(), True))
# calibrated, training-free, with s of the k active groups shared: what 'auto' chooses from
SHARED_SWEEP = ((32, 4), (32, 8), (32, 16), (64, 16), (64, 32))  # (E, k)
SHARED_COUNTS = (0, 1, 2, 3, 4, 6, 8)
SECTIONS = ("curve", "ablation", "shared")


def moe_row(dense, validation, batches, experts: int, fraction: float, fields: dict, calibrated: bool,
            distill_steps: int) -> dict:
    fields = {"num_experts": experts, "distill_steps": distill_steps, **fields}
    return evaluate_split(dense, fields, fraction, validation, batches if calibrated else None,
                          max_windows=EVAL_WINDOWS)


def planned_rows(section: str) -> Iterator[tuple[dict, int, float, dict, bool]]:
    """(label, experts, active fraction, config fields, calibrated) of each row of one section."""
    if section == "curve":
        for method, fields, calibrated in CURVE_METHODS:
            for fraction in CURVE_FRACTIONS:
                yield {"method": method}, CURVE_EXPERTS, fraction, fields, calibrated
    elif section == "ablation":
        for experts in ABLATION_EXPERTS:
            for fraction in ABLATION_FRACTIONS:
                for step, fields, calibrated in ABLATION:
                    yield {"step": step}, experts, fraction, fields, calibrated
    else:
        for experts, top_k in SHARED_SWEEP:
            for shared in SHARED_COUNTS:
                if shared <= top_k // 2:
                    fields = dict(shared_experts=shared, distill_steps=0)
                    yield {"shared": shared}, experts, top_k / experts, fields, True


def evaluate(variant: str, sections: Sequence[str], distill_steps: int) -> dict:
    """The rows of `sections` for one checkpoint, kept beside the other sections of its result file. The file is
    rewritten after each row, so a stopped run keeps its rows."""
    dense = load_checkpoint(CHECKPOINTS / f"tiny_gpt_{variant}.safetensors")
    validation, batches = stdlib_bytes("validation"), calibration_batches()
    path = RESULTS / f"split_experts_{variant}.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update(variant=variant, dense=perplexity(dense, validation, max_windows=EVAL_WINDOWS))
    print(f"{variant}: dense perplexity {result['dense']:.3f}", flush=True)
    for section in sections:
        result[section] = []
        result.setdefault("machine", {})[section] = {
            "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__}
        for label, experts, fraction, fields, calibrated in planned_rows(section):
            row = moe_row(dense, validation, batches, experts, fraction, fields, calibrated, distill_steps)
            result[section].append({**label, **row})
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(f"  {section} E={experts:3d} {row['active']:6.1%} {next(iter(label.values()))!s:44} "
                  f"ppl {row['perplexity']:8.3f}  {row['convert_seconds']:5.1f} s", flush=True)
    return result


def _cell(rows: list[dict], dense: float) -> str:
    return f"{rows[0]['perplexity']:.3f} ({rows[0]['perplexity'] / dense - 1:+.1%})" if rows else "-"


def _machine(result: dict, section: str) -> str:
    machine = result.get("machine", {}).get(section)
    if not machine:
        return "machine not recorded"
    return (f"{machine['threads']} thread(s) of {machine['cpus']} cores, load average "
            f"{machine['load_average_at_start'][0]:.1f} at the start, torch {machine['torch']}")


def markdown(results: list[dict]) -> str:
    lines = ["# Split experts on trained GPTs", "",
             "Generated by `examples/eval_split_experts.py` (validation perplexity of byte-level GPTs trained by "
             "`examples/train_tiny_gpts.py`; k of E experts per token, active FFN = k/E including shared neurons; "
             "in parentheses: change against the dense model). '-' marks a row the run did not reach.", ""]
    for result in results:
        dense = result["dense"]
        lines += [f"## {result['variant']} (dense perplexity {dense:.3f})", "", f"Curve, E = {CURVE_EXPERTS}:", ""]
        rows = [("method", *(f"{f:.1%} active" for f in CURVE_FRACTIONS))]
        for method, _, _ in CURVE_METHODS:
            rows.append((method, *(_cell([r for r in result["curve"] if r["method"] == method
                                          and abs(r["active"] - f) < 1e-6], dense) for f in CURVE_FRACTIONS)))
        rows.append(("shared groups s of k (auto)", *(
            f"{shared_label(r[0])} of {r[0]['top_k']}" if (r := [x for x in result["curve"] if x["method"] ==
                                                                      CURVE_METHODS[1][0] and
                                                                      abs(x["active"] - f) < 1e-6]) else "-"
            for f in CURVE_FRACTIONS)))
        lines += ["```", format_table(rows), "```", ""]
        if result.get("ablation"):
            combos = [(e, f) for e in ABLATION_EXPERTS for f in ABLATION_FRACTIONS]
            pick = lambda step, e, f: [r for r in result["ablation"] if r["step"] == step and  # noqa: E731
                                       r["experts"] == e and abs(r["active"] - f) < 1e-6]
            rows = [("step", *(f"E={e} {f:.0%}" for e, f in combos))]
            rows += [(step, *(_cell(pick(step, e, f), dense) for e, f in combos)) for step, _, _ in ABLATION]
            rows.append(("shared groups s of k",
                         *(f"{shared_label(r[0])} of {r[0]['top_k']}" if (r := pick("+ shared neurons", e, f))
                           else "-" for e, f in combos)))
            lines += ["Ablation (each row adds one part to the row above):", "", "```", format_table(rows), "```", ""]
            recall = [(e, f, r[0]["router_recall_held_out"]) for e, f in combos
                      if (r := pick("+ compensation", e, f)) and r[0].get("router_recall_held_out") is not None]
            if recall:
                lines += ["Held-out router recall (calibrated, training-free): "
                          + ", ".join(f"E={e} {f:.0%}: {value:.2f}" for e, f, value in recall), ""]
            timed = [r for r in result["ablation"] if r["step"] == "+ distillation" and r.get("convert_seconds")]
            if timed:
                lines += [f"Conversion time with distillation (calibration + build + distillation; "
                          f"{_machine(result, 'ablation')}): " + ", ".join(
                              f"E={r['experts']} {r['active']:.0%}: {r['convert_seconds']:.0f} s" for r in timed), ""]
        if result.get("shared"):
            rows = [("E, k", *(f"s={s}" for s in SHARED_COUNTS))]
            for experts, top_k in SHARED_SWEEP:
                cells = {r["shared"]: r for r in result["shared"] if r["experts"] == experts and r["top_k"] == top_k}
                rows.append((f"E={experts}, k={top_k}", *(
                    f"{cells[s]['perplexity'] / dense - 1:+.1%}" if s in cells else ""
                    for s in SHARED_COUNTS)))
            lines += ["Shared neuron groups (calibrated, training-free; s of the k active groups always on):", "",
                      "```", format_table(rows), "```", ""]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results):
        for method, _, _ in CURVE_METHODS:
            rows = [r for r in result["curve"] if r["method"] == method]
            ax.plot([r["active"] * 100 for r in rows], [r["perplexity"] for r in rows], marker="o", label=method)
        ax.axhline(result["dense"], color="black", linestyle="--", label="dense")
        ax.set(title=f"{result['variant']} GPT, E = {CURVE_EXPERTS}", xlabel="active FFN neurons (%)",
               ylabel="validation perplexity", yscale="log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=VARIANTS, action="append")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="which tables to measure (default all); the others keep their saved rows")
    parser.add_argument("--distill-steps", type=int, default=200, help="per layer, for the distillation rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs from the saved JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report_only:
        RESULTS.mkdir(parents=True, exist_ok=True)
        for variant in args.only or VARIANTS:
            evaluate(variant, args.sections, args.distill_steps)
    paths = [RESULTS / f"split_experts_{v}.json" for v in VARIANTS]
    results = [json.loads(path.read_text()) for path in paths if path.is_file()]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(markdown(results))
    plot(results, PLOT)
    print(f"wrote {DOC}, {PLOT}")


if __name__ == "__main__":
    main()
