"""How fusedecay's ``step`` methods and functional entry points switch grad mode off and keep torch's step hooks.

torch wraps every optimizer's ``step`` (``Optimizer.profile_hook_step``) in
``torch.autograd.profiler.record_function("Optimizer.step#<class>.step")`` around the step pre/post hooks, and
optimizers add ``@torch.no_grad()``. Both are Python layers over C++ calls, and in training they run with cold
caches (a forward and backward pass ran since the last step). On the Intel Xeon VM of bench/results, after
512 MiB were written, the range alone took ~0.13 ms per step and the no_grad decorator ~0.04 ms (each
measured around an empty body by bench/cold_call_costs.py) — ~2 % of a 13.6M-param step, the no_grad twice where a
functional call adds its own.

:func:`optimizer_step` does what torch's wrapper and ``@torch.no_grad()`` do, in the same order (hooks in the
caller's grad mode, the step with grad off), but opens the profiler range only while a profiler is on, and
switches grad mode with the one C call torch's context manager ends in. Under ``torch.compile`` (and while
profiling) it takes torch's own path. If this torch's optimizer module lacks the global hook registries it reads,
the step keeps torch's wrapper (and ``torch.no_grad``).
"""
from __future__ import annotations

import functools
from itertools import chain
from typing import Callable, TypeVar

import torch
from torch.autograd import profiler as _profiler
from torch.optim import optimizer as _torch_optimizer

F = TypeVar("F", bound=Callable)

_GLOBAL_PRE = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
_GLOBAL_POST = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
_set_grad = torch._C._set_grad_enabled
_grad_on = torch._C.is_grad_enabled
_profiler_on = torch._C._autograd._profiler_enabled
_compiling = torch.compiler.is_compiling


def _profiling() -> bool:
    """A profiler is recording (torch.profiler / torch.autograd.profiler, the NVTX and ITT emitters)."""
    return _profiler._is_profiler_enabled or _profiler_on()


def no_grad(func: F) -> F:
    """``torch.no_grad()`` as a decorator, for functions called once per step: nothing to do when grad mode is
    already off (inside an optimizer step), else one C call each way."""
    @functools.wraps(func)
    def run(*args, **kwargs):
        if not _grad_on():
            return func(*args, **kwargs)
        if _compiling():
            with torch.no_grad():
                return func(*args, **kwargs)
        _set_grad(False)
        try:
            return func(*args, **kwargs)
        finally:
            _set_grad(True)
    return run  # type: ignore[return-value]


def _call_hooked(func: Callable, args: tuple, kwargs: dict, compiling: bool = False):
    """torch's step wrapper without its profiler range: global and per-optimizer pre hooks (which may replace the
    arguments), the step with grad off (``torch.no_grad()`` for dynamo to trace when ``compiling``),
    ``_optimizer_step_code`` (the profiler's marker), the post hooks."""
    self = args[0]
    pre = self._optimizer_step_pre_hooks
    if pre or _GLOBAL_PRE:
        for hook in chain(_GLOBAL_PRE.values(), pre.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(f"{func} must return None or a tuple of (new_args, new_kwargs), but got "
                                       f"{result}.")
    if compiling:
        with torch.no_grad():
            out = func(*args, **kwargs)
    else:
        prev = _grad_on()
        _set_grad(False)
        try:
            out = func(*args, **kwargs)
        finally:
            _set_grad(prev)
    self._optimizer_step_code()
    post = self._optimizer_step_post_hooks
    if post or _GLOBAL_POST:
        for hook in chain(post.values(), _GLOBAL_POST.values()):
            hook(self, args, kwargs)
    return out


def optimizer_step(func: F) -> F:
    """Decorator for an optimizer's ``step(self, closure=None)``: grad mode off, torch's step hooks, and the
    profiler range ``Optimizer.step#<class>.step`` while a profiler records (see the module docstring)."""
    if _GLOBAL_PRE is None or _GLOBAL_POST is None:
        return torch.no_grad()(func)   # torch.optim.Optimizer wraps it as it does any step

    @functools.wraps(func)
    def step(*args, **kwargs):
        if type(args[0]).step is not step:
            # Reached through a subclass's own step (super().step()), which torch.optim.Optimizer wrapped: its
            # wrapper ran the hooks and opened the range; here only grad mode, as @torch.no_grad() would.
            with torch.no_grad():
                return func(*args, **kwargs)
        if _compiling():   # what torch's wrapper and @torch.no_grad() do, for dynamo to trace
            with _profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _call_hooked(func, args, kwargs, compiling=True)
        if _profiling():
            with _profiler.record_function(f"Optimizer.step#{type(args[0]).__name__}.step"):
                return _call_hooked(func, args, kwargs)
        return _call_hooked(func, args, kwargs)

    step.hooked = True  # type: ignore[attr-defined]  # torch.optim.Optimizer wraps a step only while this is unset
    return step  # type: ignore[return-value]
