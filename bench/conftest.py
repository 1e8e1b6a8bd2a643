"""pytest setup for the benchmark suite (``pytest bench/ --benchmark-json=...``).

Imports fusedecay from this checkout (an in-place build of the compiled extension included) and adds
the run's device, versions and commit to pytest-benchmark's JSON under ``"fusedecay_run"``. Unlike
tests/conftest.py this does not turn on the Triton interpreter: an emulated kernel's speed means nothing.
"""
import gc
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "python"))
sys.path.insert(0, _HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

from run_info import bench_device, run_info  # noqa: E402


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["fusedecay_run"] = run_info(bench_device())


@pytest.fixture(autouse=True)
def _free_memory_between_cases():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
