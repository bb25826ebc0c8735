"""Time and peak memory of a calibrated conversion of a GPT-2-small-shaped model (12 layers, d 768, d_ff 3072,
random weights: the cost does not depend on the values) with 256 sequences of 256 tokens.

    python benchmarks/calibration_cost.py                  # writes benchmarks/results/calibration_cost.json
    python benchmarks/calibration_cost.py --sequences 64   # a quarter of the data (see below)

With fewer sequences the recording costs proportionally less, the rest (each site's sample is capped at 8,192
tokens, so k-means, router fit and compensation do not grow) the same: the full cost is about
convert_seconds + (256 / sequences - 1) * forward_seconds.

Timed parts: the model alone on the calibration batches (the recording runs each batch only up to its last FFN, so
it pays less: no LM head), then convert(..., calibration_data=...) with the calibrated defaults (E = 8, top-2,
shared groups chosen per layer; no distillation). Peak memory is the process's maximum resident set size (Linux
ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import moe_compile as mc

RESULTS = Path(__file__).resolve().parent / "results" / "calibration_cost.json"


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=256)).eval()
    batches = list(torch.randint(0, 50257, (args.sequences, 256)).split(8))
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch, use_cache=False)
    forward = time.perf_counter() - start
    start = time.perf_counter()
    moe = mc.convert(model, mc.MoEConfig(num_experts=8, top_k=2, experts="split", distill_steps=0),
                     calibration_data=batches,
                     progress=True)
    convert_seconds = time.perf_counter() - start
    result = {"model": "GPT-2 small shape (12 x 768, d_ff 3072)", "tokens": args.sequences * 256,
              "forward_seconds": forward, "convert_seconds": convert_seconds,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "config": moe.moe_report.config.to_dict(), "threads": torch.get_num_threads()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
