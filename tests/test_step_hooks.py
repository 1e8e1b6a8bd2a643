"""The wrapper around our optimizers' ``step`` (python/fusedecay/optim/_step.py) against torch's own
(``Optimizer.profile_hook_step``, which wraps torch's AdamW): the same hooks in the same order with the same
arguments, a pre-hook's replacement arguments, its error for a bad return value, and the profiler range while
profiling."""
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from fusedecay import AdamC, AdamHD, ScionC

MAKERS = {
    "AdamHD": lambda ps: AdamHD(ps, lr=1e-2, weight_decay=0.1),
    "AdamC": lambda ps: AdamC(ps, lr=1e-2, weight_decay=0.1),
    "ScionC": lambda ps: ScionC([dict(params=ps[:1], lmo="spectral"), dict(params=ps[1:], lmo="bias")], lr=1e-2),
}


def _params():
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(8, 8, generator=g)), torch.nn.Parameter(torch.randn(8, generator=g))]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


def _hook_log(opt):
    """Runs opt.step(closure) with a global and a per-optimizer pre- and post-hook; the pre-hook swaps the closure.
    Returns what each hook and closure saw, in order."""
    log = []

    def closure_a():
        log.append("closure a")
        return torch.tensor(1.0)

    def closure_b():
        log.append("closure b")
        return torch.tensor(2.0)

    def pre(name):
        def hook(o, args, kwargs):
            log.append((f"{name} pre", o is opt, len(args), sorted(kwargs)))
            if name == "own":
                return (args[0],), {"closure": closure_b}   # new args and kwargs for the step
        return hook

    def post(name):
        def hook(o, args, kwargs):
            log.append((f"{name} post", o is opt, len(args), sorted(kwargs)))
        return hook

    handles = [register_optimizer_step_pre_hook(pre("global")), register_optimizer_step_post_hook(post("global")),
               opt.register_step_pre_hook(pre("own")), opt.register_step_post_hook(post("own"))]
    try:
        loss = opt.step(closure=closure_a)
    finally:
        for h in handles:
            h.remove()
    log.append(("loss", float(loss)))
    return log


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_hooks_run_as_around_torchs_adamw(name):
    want = _hook_log(torch.optim.AdamW(_params(), lr=1e-2))
    assert want[-2:] == [("global post", True, 1, ["closure"]), ("loss", 2.0)]   # the truth is what it should be
    assert _hook_log(MAKERS[name](_params())) == want


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_bad_pre_hook_return_raises_as_torch_does(name):
    for opt in (torch.optim.AdamW(_params(), lr=1e-2), MAKERS[name](_params())):
        ps = [p for g in opt.param_groups for p in g["params"]]
        before = [p.detach().clone() for p in ps]
        h = opt.register_step_pre_hook(lambda o, args, kwargs: "not a tuple")
        try:
            with pytest.raises(RuntimeError, match="must return None or a tuple of"):
                opt.step()
        finally:
            h.remove()
        assert all(torch.equal(p, b) for p, b in zip(ps, before))   # nothing stepped


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_profiler_sees_the_step_range_and_only_while_profiling(name):
    opt = MAKERS[name](_params())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert f"Optimizer.step#{name}.step" in names
    assert not torch.autograd.profiler._is_profiler_enabled   # the flag the wrapper reads is off again
    opt.step()                                                  # and a step outside the profiler runs as before


def test_our_steps_are_marked_so_torch_does_not_wrap_them_again():
    """torch's Optimizer.__init__ wraps a class's step unless it is marked ``hooked``: ours keep our wrapper."""
    from fusedecay.optim._step import hooked_step
    ours = hooked_step(lambda self: None).__code__   # every wrapper it makes runs this code
    for name, make in MAKERS.items():
        opt = make(_params())
        assert type(opt).step.hooked is True and type(opt).step.__code__ is ours, name
