"""The training text: the Python standard library's own ``*.py`` sources, read from disk as bytes.

Deterministic: files are sorted by their path relative to the corpus folder; every ``VAL_EVERY``-th
file (1-based positions 20, 40, …) goes to validation, the rest to training, so train and validation
never share a file. ``site-packages``/``dist-packages`` (third-party code that happens to live below
the stdlib folder) and ``__pycache__`` are skipped. Tokens are raw UTF-8 bytes (vocabulary 256).
Different Python versions ship different stdlib sources, so the corpus (and the numbers) depend on
the interpreter; the metrics JSON records the folder, file counts and byte counts.
"""
from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

VAL_EVERY = 20
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_sources(root: Path) -> List[Path]:
    """Sorted ``*.py`` files below ``root``; raises if there are none (naming the folder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {str(root)!r} does not exist or is not a folder")
    rel = lambda p: p.relative_to(root)  # noqa: E731
    files = sorted((p for p in root.rglob("*.py") if p.is_file() and not SKIP_DIRS.intersection(rel(p).parts)),
                   key=lambda p: rel(p).as_posix())
    if not files:
        raise FileNotFoundError(f"no *.py files found under corpus folder {str(root)!r} "
                                "(pass --corpus-dir pointing at a folder of Python sources)")
    return files


def split_files(files: List[Path]) -> Tuple[List[Path], List[Path]]:
    """(train, val): every VAL_EVERY-th file is validation; with fewer files, the last one is."""
    if len(files) < 2:
        raise ValueError(f"the corpus needs at least 2 source files for a train/val split, found {len(files)}")
    if len(files) >= VAL_EVERY:
        val_idx = set(range(VAL_EVERY - 1, len(files), VAL_EVERY))
    else:
        val_idx = {len(files) - 1}
    train = [f for i, f in enumerate(files) if i not in val_idx]
    val = [f for i, f in enumerate(files) if i in val_idx]
    return train, val


def _read(files: List[Path]) -> Tensor:
    data = b"\n".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


@dataclass
class Corpus:
    root: str
    train: Tensor   # uint8 byte stream
    val: Tensor
    n_train_files: int
    n_val_files: int

    def describe(self) -> dict:
        return {"root": self.root, "train_files": self.n_train_files, "val_files": self.n_val_files,
                "train_bytes": int(self.train.numel()), "val_bytes": int(self.val.numel())}


def load_corpus(root: Optional[Path] = None, min_bytes: int = 0) -> Corpus:
    """Read and split the corpus; ``min_bytes`` is the shortest train/val stream the caller can sample."""
    root = Path(root) if root is not None else default_corpus_dir()
    train_files, val_files = split_files(list_sources(root))
    train, val = _read(train_files), _read(val_files)
    for name, t in (("train", train), ("val", val)):
        if t.numel() < min_bytes:
            raise ValueError(f"the {name} split of corpus folder {str(root)!r} has {t.numel()} bytes; "
                             f"need at least {min_bytes} (seq_len + 1)")
    return Corpus(str(root), train, val, len(train_files), len(val_files))


def train_batches(data: Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless random windows (x, y) of the train stream, the same sequence for the same seed."""
    g = torch.Generator().manual_seed(seed)
    hi = data.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, hi + 1, (batch_size,), generator=g)
        yield _windows(data, starts, seq_len)


def val_batches(data: Tensor, batch_size: int, seq_len: int, n_batches: int) -> List[Tuple[Tensor, Tensor]]:
    """A fixed validation set: ``n_batches·batch_size`` windows spread evenly over the val stream."""
    n = n_batches * batch_size
    hi = data.numel() - seq_len - 1
    starts = torch.linspace(0, hi, n).long() if n > 1 else torch.zeros(1, dtype=torch.long)
    return [_windows(data, starts[i:i + batch_size], seq_len) for i in range(0, n, batch_size)]


def _windows(data: Tensor, starts: Tensor, seq_len: int) -> Tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]
