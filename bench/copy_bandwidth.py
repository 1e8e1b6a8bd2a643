"""Measured copy bandwidth: the ceiling that the optimizer steps' GB/s are compared with.

One large ``dst.copy_(src)`` on the benchmark device (device-to-device on GPU, memcpy through torch's
threaded copy on CPU), counting bytes read + bytes written (2 × buffer size), median of many rounds.
The step benchmark measures it inside the same pytest run (``test_copy_bandwidth``), so every
"% of copy bandwidth" figure compares with a ceiling taken minutes earlier on the same machine.

    python bench/copy_bandwidth.py [--device cpu|cuda] [--mib 256]
"""
from __future__ import annotations

import argparse
from typing import Callable, Tuple

import torch

# Buffer sizes: far above any L2/L3 (H100 L2 is 50 MB), small enough for a 2-core CI box.
DEFAULT_MIB = {"cpu": 256, "cuda": 1024}


def copy_case(device: torch.device, mib: int = 0) -> Tuple[Callable[[], object], int]:
    """(fn, bytes moved per call) for a copy of ``mib`` MiB (default per device type)."""
    mib = mib or DEFAULT_MIB.get(device.type, 256)
    n = mib * (1 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def main() -> None:
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from run_info import bench_device, device_name
    from timing import median_ms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--mib", type=int, default=0)
    a = ap.parse_args()
    dev = torch.device(a.device) if a.device else bench_device()
    fn, nbytes = copy_case(dev, a.mib)
    ms = median_ms(fn, dev)
    print(f"{device_name(dev)}: copy of {nbytes // 2 / 2**20:.0f} MiB: median {ms:.3f} ms, "
          f"{nbytes / ms / 1e6:.1f} GB/s (read + write)")


if __name__ == "__main__":
    main()
