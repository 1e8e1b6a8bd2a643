"""The wrapper around an optimizer's ``step``: what ``torch.optim.Optimizer`` puts there, with less host time.

torch wraps every optimizer class's ``step`` once (``Optimizer.profile_hook_step``, unless the function is marked
``hooked``): step pre-hooks (the global ones, then the optimizer's; one may return new ``(args, kwargs)``), the step,
``_optimizer_step_code()`` (a marker for profilers), post-hooks (the optimizer's, then the global ones), all inside a
profiler range named ``Optimizer.step#<class>.step``. :func:`hooked_step` does the same, but enters that range only
while the autograd profiler is on (torch's ``_is_profiler_enabled``, the flag it keeps for such fast checks): entering
it costs ~0.2 ms per step on the CPU when a forward and backward pass have evicted the caches, as much as some small
models' whole optimizer step (``bench/step_breakdown.py``). Under the profiler the range is there as with torch.
"""
from __future__ import annotations

import functools
from itertools import chain

import torch
from torch.autograd import profiler as _profiler
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def hooked_step(func):
    """``func`` (an optimizer class's ``step``) wrapped as torch does, the profiler range only while profiling."""

    @functools.wraps(func)
    def step(*args, **kwargs):
        self = args[0]
        if _profiler._is_profiler_enabled:
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return _with_hooks(func, self, args, kwargs)
        return _with_hooks(func, self, args, kwargs)

    step.hooked = True   # torch's Optimizer.__init__ then leaves it as it is
    return step


def _with_hooks(func, self, args, kwargs):
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
        result = pre_hook(self, args, kwargs)
        if result is not None:
            if isinstance(result, tuple) and len(result) == 2:
                args, kwargs = result
            else:
                raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
    out = func(*args, **kwargs)
    self._optimizer_step_code()
    for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(self, args, kwargs)
    return out
