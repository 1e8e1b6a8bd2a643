"""What every benchmark row carries about the run: device, library versions and the code's commit."""
from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import re
import subprocess
from typing import Dict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_device() -> torch.device:
    """``FUSEDECAY_BENCH_DEVICE`` (cpu | cuda) if set, else cuda when present, else cpu."""
    want = os.environ.get("FUSEDECAY_BENCH_DEVICE")
    if want:
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git_commit() -> str:
    """HEAD (with ``+dirty`` when tracked files outside bench/results/ changed); ``FUSEDECAY_COMMIT`` wins; a copy without
    .git gets a content hash of the sources instead, labelled as such."""
    if os.environ.get("FUSEDECAY_COMMIT"):
        return os.environ["FUSEDECAY_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        # Result files the benchmarks themselves (re)write do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "no-git:sources-sha256:" + sources_hash()[:16]


def sources_hash() -> str:
    h = hashlib.sha256()
    for top in ("python", "csrc", "triton_kernels", "bench", "setup.py"):
        root = os.path.join(REPO, top)
        paths = [root] if os.path.isfile(root) else sorted(
            os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
            if f.endswith((".py", ".cpp", ".cu", ".cuh", ".h")) and "results" not in d)
        for p in paths:
            h.update(os.path.relpath(p, REPO).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def versions() -> Dict[str, str]:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # triton is optional
        tv = "absent"
    return {"torch": torch.__version__, "triton": tv, "cuda": torch.version.cuda or "none",
            "python": platform.python_version()}


def run_info(device: torch.device) -> Dict[str, object]:
    return {"device": device.type, "device_name": device_name(device), "threads": torch.get_num_threads(),
            **versions(), "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
