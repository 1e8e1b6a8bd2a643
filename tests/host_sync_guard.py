"""A context manager that fails on any Python-level read of a tensor's value on the host.

Inside ``optimizer.step()`` none of these may run: on a GPU each one waits for the device (a host sync) and is
illegal inside a CUDA-graph capture. The guard patches them on ``torch.Tensor`` for the duration of the block,
whatever the tensor's device, so a CPU test catches the same code paths a GPU run would sync on.
"""
import contextlib

import torch

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__")


@contextlib.contextmanager
def no_host_reads():
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def forbid(name):
        def call(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor (Tensor.{name}) inside step(): shape {tuple(self.shape)}, "
                                 f"{self.dtype}, {self.device}")
        return call
    for name in HOST_READS:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
