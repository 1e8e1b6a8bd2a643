"""What torch.optim.Optimizer's own step wrapper gives every optimizer, fusedecay's steps give too
(fusedecay/_step_wrapper.py replaces it with a lighter one; torch's AdamW is the truth here):

* step pre/post hooks, global and per optimizer, run in torch's order, around the step; a pre hook that returns
  new (args, kwargs) changes what the step gets;
* hooks run in the caller's grad mode, the step itself with grad off, and grad mode is back afterwards, also when
  the step raises;
* under a profiler the step is the range ``Optimizer.step#<class>.step``; without one no range is opened;
* a subclass whose own ``step`` calls ``super().step()`` (torch wraps the subclass's step) runs each hook once;
* an lr scheduler sees the optimizer step (no "lr_scheduler.step() before optimizer.step()" warning);
* the functional entry points switch grad off for params that require grad, and back.
"""
import importlib
import warnings

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from fusedecay import AdamC, AdamHD, ScionC
from fusedecay import functional as F

OPTIMIZERS = {
    "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),   # the truth
    "adamhd": lambda ps: AdamHD(ps, lr=1e-2, weight_decay=0.1),
    "adamc": lambda ps: AdamC(ps, lr=1e-2, weight_decay=0.1),
    "scionc": lambda ps: ScionC(ps, lr=1e-2, lmo="sign"),
}
OURS = [k for k in OPTIMIZERS if k != "torch-adamw"]


def _setup(name):
    p = torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
    p.grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    return OPTIMIZERS[name]([p]), p


def _hook_trace(name):
    """(events, loss) of one step with two global and two per-optimizer hooks; the per-optimizer pre hook replaces
    the closure."""
    opt, p = _setup(name)
    events = []
    grad_modes = {}

    def closure_a():
        events.append("closure a")
        return torch.tensor(1.0)

    def closure_b():
        events.append("closure b")
        grad_modes["closure"] = torch.is_grad_enabled()
        return torch.tensor(2.0)

    def pre_own(o, args, kwargs):
        assert o is opt and args[0] is opt
        events.append("pre own")
        grad_modes["pre"] = torch.is_grad_enabled()
        return (args[0],), {"closure": closure_b}

    def post_own(o, args, kwargs):
        events.append(("post own", kwargs["closure"].__name__))
        grad_modes["post"] = torch.is_grad_enabled()

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: events.append("pre global")),
               register_optimizer_step_post_hook(lambda o, a, k: events.append("post global")),
               opt.register_step_pre_hook(pre_own), opt.register_step_post_hook(post_own)]
    try:
        with torch.enable_grad():
            loss = opt.step(closure_a)
            grad_modes["after"] = torch.is_grad_enabled()
    finally:
        for h in handles:
            h.remove()
    return events, float(loss), grad_modes


@pytest.mark.parametrize("name", OURS)
def test_step_hooks_run_as_torch_runs_them(name):
    truth = _hook_trace("torch-adamw")
    assert truth[0] == ["pre global", "pre own", "closure b", ("post own", "closure_b"), "post global"]
    assert truth[1] == 2.0 and truth[2] == {"pre": True, "closure": True, "post": True, "after": True}
    assert _hook_trace(name) == truth


@pytest.mark.parametrize("name", OURS)
def test_a_pre_hook_returning_something_else_raises_as_torch_does(name):
    for which in ("torch-adamw", name):
        opt, _ = _setup(which)
        h = opt.register_step_pre_hook(lambda o, a, k: "not a pair")
        with pytest.raises(RuntimeError, match="must return None or a tuple of \\(new_args, new_kwargs\\)"):
            opt.step()
        h.remove()


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("grad_before", [True, False])
def test_step_runs_with_grad_off_and_restores_the_callers_mode(name, grad_before, monkeypatch):
    opt, p = _setup(name)
    seen = []
    fn_name = "scionc" if name == "scionc" else "adam_decay"   # the functional entry the optimizer module calls
    mod = importlib.import_module(f"fusedecay.optim.{fn_name}")
    real = getattr(mod, fn_name)

    def spy(*a, **k):
        seen.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(mod, fn_name, spy)
    with torch.set_grad_enabled(grad_before):
        opt.step()
        assert torch.is_grad_enabled() is grad_before
    assert seen == [False]

    def failing(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(mod, fn_name, failing)
    with torch.set_grad_enabled(grad_before):
        with pytest.raises(RuntimeError, match="boom"):
            opt.step()
        assert torch.is_grad_enabled() is grad_before


@pytest.mark.parametrize("name", OURS)
def test_profiler_sees_the_step_range_as_for_torch_and_no_range_is_opened_without_one(name, monkeypatch):
    def ranges(which):
        opt, _ = _setup(which)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        return {e.name for e in prof.events() if e.name.startswith("Optimizer.step#")}

    assert ranges("torch-adamw") == {"Optimizer.step#AdamW.step"}
    assert ranges(name) == {f"Optimizer.step#{type(_setup(name)[0]).__name__}.step"}

    opened = []
    real = torch.autograd.profiler.record_function

    class Counting(real):
        def __init__(self, *a, **k):
            opened.append(a[0])
            super().__init__(*a, **k)

    monkeypatch.setattr(torch.autograd.profiler, "record_function", Counting)
    opt, _ = _setup(name)
    opt.step()
    assert opened == []
    torch_opt, _ = _setup("torch-adamw")
    torch_opt.step()
    assert opened == ["Optimizer.step#AdamW.step"]   # the counter sees torch's range: it would see ours


@pytest.mark.parametrize("name", OURS)
def test_a_subclass_step_calling_super_runs_each_hook_once(name):
    base = type(_setup(name)[0])

    class Sub(base):
        def step(self, closure=None):
            self.sub_steps = getattr(self, "sub_steps", 0) + 1
            return super().step(closure)

    p = torch.nn.Parameter(torch.randn(5, 3))
    p.grad = torch.randn(5, 3)
    opt = Sub([p], lr=1e-2)
    calls = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("pre global")),
               opt.register_step_pre_hook(lambda o, a, k: calls.append("pre own")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post own"))]
    try:
        before = p.detach().clone()
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert calls == ["pre global", "pre own", "post own"] and opt.sub_steps == 1
    assert not torch.equal(p.detach(), before) and p.grad_fn is None


@pytest.mark.parametrize("name", OURS)
def test_lr_scheduler_sees_the_optimizer_step(name):
    opt, _ = _setup(name)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_functional_adam_decay_switches_grad_off_for_params_that_require_grad():
    p = torch.nn.Parameter(torch.randn(7))
    g, m, v, t = torch.randn(7), torch.zeros(7), torch.zeros(7), torch.zeros(())
    with torch.enable_grad():
        F.adam_decay([p], [g], [m], [v], [t], None, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                     decay="l2")
        assert torch.is_grad_enabled()
    assert float(t) == 1.0 and p.requires_grad and p.grad_fn is None
