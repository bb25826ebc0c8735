"""Set up .venv (torch==2.13.0 CPU + moe-compile with its test extra) when needed, then run a job.

    python3 dev.py demo    convert the embedded example GPT with every routing, export it, check parity
    python3 dev.py test    run the test suite, a worker per core (no tests collected counts as a failure)
    python3 dev.py clients also set up .venv-clients (optimum-onnx, which pins transformers < 4.58) and check which
                           family's text-generation export runs in our runner, onnxruntime-genai and optimum

Needs only Python >= 3.10 with pip and venv.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".moe-compile-installed"
CLIENTS = ROOT / ".venv-clients"  # optimum's pins clash with ours: its own environment
CLIENTS_PYTHON = CLIENTS / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
CLIENT_PACKAGES = ("optimum-onnx[onnxruntime]==0.1.0", "transformers<4.58")
TORCH = "torch==2.13.0"  # pinned: an unpinned torch pulls a multi-GB CUDA build


def _run(*cmd: str) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def ensure_venv() -> None:
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PYTHON.exists() and _run(sys.executable, "-m", "venv", str(VENV)):
        sys.exit("dev.py: could not create .venv; install your Python's venv module (Debian: python3-venv).")
    pip = (str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check")
    if _run(*pip, TORCH) or _run(*pip, "-e", ".[test]"):
        sys.exit("dev.py: installing the dependencies failed (see pip's message above).")
    STAMP.write_text(wanted)


def ensure_clients_venv() -> None:
    if CLIENTS_PYTHON.exists():
        return
    if _run(sys.executable, "-m", "venv", str(CLIENTS)) or _run(
            str(CLIENTS_PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", TORCH,
            *CLIENT_PACKAGES):
        sys.exit("dev.py: setting up .venv-clients failed (see pip's message above).")


def main(argv: list[str]) -> int:
    jobs = {"demo": [str(PYTHON), "examples/demo.py"],
            "test": [str(PYTHON), "-m", "pytest", "-q", "-n", "auto", "--durations=10"],
            "clients": [str(PYTHON), "examples/generation_clients.py", "--optimum-python", str(CLIENTS_PYTHON)]}
    if not argv or argv[0] not in jobs:
        print(__doc__)
        return 2
    ensure_venv()
    if argv[0] == "clients":
        ensure_clients_venv()
    code = _run(*jobs[argv[0]], *argv[1:])
    if argv[0] == "test" and code == 5:
        print("dev.py: pytest collected no tests; that is a failure, not a pass.", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
