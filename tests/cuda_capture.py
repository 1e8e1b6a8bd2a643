"""Shared helper of the GPU tests: run a call inside a CUDA-graph capture and expect it to refuse."""
import pytest
import torch


def assert_refused_during_capture(fn, match: str) -> None:
    """``fn()`` called while a CUDA graph is being captured (on a side stream) must raise ValueError(match)."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            with pytest.raises(ValueError, match=match):
                fn()
    torch.cuda.current_stream().wait_stream(side)
