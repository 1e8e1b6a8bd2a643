"""Switching optimizers mid-run: torch AdamW/Adam state into AdamHD/AdamC (and back), as long runs do for
their decay phase.

The truth is a float64 closed form written here: Adam's moments with bias correction, AdamW's decoupled
decay, AdamHD's proximal Huber step with μ an EMA of mean|θ| started from the weights at the switch, and
AdamC's λ_t = λγ_t/γ_max. A run trains k steps with one optimizer, switches with ``load_state_dict`` (or
``fusedecay.load_adam_state`` for a torch target), trains on; it must match the closed form that used the
first optimizer's update up to step k and the second's, with the second's hyperparameters and the
carried moments and step, after. The DCP form of the switch is tested in test_distributed.py.
"""
import warnings

import pytest
import torch

import fusedecay
from fusedecay import AdamC, AdamHD, ScionC
from tolerances import assert_close

SHAPES = [(5, 4), (7,), (3, 2, 2), (0,)]
K = 3           # steps before the switch
AFTER = 3       # steps after it

OLD = dict(lr=0.02, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)     # the first optimizer's
NEW = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.3)     # the second's: they must be the ones used
HD = dict(delta_scale=1.5, delta_beta=0.9)
MAX_LR = 0.012                                                         # AdamC's γ_max


def _lr(t):      # a decaying schedule after the switch, so AdamC's correction λγ_t/γ_max moves
    return NEW["lr"] * (1 - 0.2 * t)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _groups(ps):   # two groups: matrices decayed, the rest not (the usual mask)
    return [{"params": [p for p in ps if p.ndim >= 2]}, {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0}]


def _grads(step, ps):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in ps]


class Truth:
    """Float64 closed forms over the same params, groups and grads."""

    def __init__(self, ps):
        self.theta = [p.detach().double().clone() for p in ps]
        self.m = [torch.zeros_like(t) for t in self.theta]
        self.v = [torch.zeros_like(t) for t in self.theta]
        self.t = 0
        self.decayed = [p.ndim >= 2 for p in ps]
        self.mu = None

    def _moments(self, grads, betas, eps):
        b1, b2 = betas
        self.t += 1
        out = []
        for i, g in enumerate(grads):
            g = g.double()
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            self.v[i] = b2 * self.v[i] + (1 - b2) * g * g
            out.append((self.m[i] / (1 - b1 ** self.t)) / ((self.v[i] / (1 - b2 ** self.t)).sqrt() + eps))
        return out

    def adamw(self, grads, lr, betas, eps, weight_decay):
        for i, u in enumerate(self._moments(grads, betas, eps)):
            lam = weight_decay if self.decayed[i] else 0.0
            self.theta[i] = self.theta[i] * (1 - lr * lam) - lr * u

    def adamc(self, grads, lr, betas, eps, weight_decay, max_lr):
        self.adamw(grads, lr, betas, eps, weight_decay * lr / max_lr)          # λ_t = λγ_t/γ_max

    def adamhd(self, grads, lr, betas, eps, weight_decay, delta_scale, delta_beta):
        if self.mu is None:                                                     # μ_0 = mean|θ| at the switch
            self.mu = [t.abs().mean() if t.numel() else torch.zeros((), dtype=torch.float64) for t in self.theta]
        for i, u in enumerate(self._moments(grads, betas, eps)):
            lam = weight_decay if self.decayed[i] else 0.0
            tilde = self.theta[i] - lr * u
            if lam:
                tau, delta = lr * lam, delta_scale * self.mu[i]
                self.theta[i] = torch.where(tilde.abs() <= (1 + tau) * delta, tilde / (1 + tau),
                                            tilde - tau * delta * tilde.sign())
                mean = self.theta[i].abs().mean() if self.theta[i].numel() else torch.zeros((), dtype=torch.float64)
                self.mu[i] = delta_beta * self.mu[i] + (1 - delta_beta) * mean
            else:
                self.theta[i] = tilde


def _step(opt, ps, step):
    for p, g in zip(ps, _grads(step, ps)):
        p.grad = g
    opt.step()


def _torch_adam(ps, form, kind="adamw", **hyper):
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[form]
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(_groups(ps), **hyper, **flags)


def _check(ps, opt, truth, moments=True):
    for i, p in enumerate(ps):
        assert_close(p.detach(), truth.theta[i], dtype=torch.float32, msg=f"param {i}")
        if moments and p.numel():
            st = opt.state[p]
            assert_close(st["exp_avg"], truth.m[i], dtype=torch.float32, msg=f"exp_avg {i}")
            assert_close(st["exp_avg_sq"], truth.v[i], dtype=torch.float32, msg=f"exp_avg_sq {i}")
            assert float(st["step"]) == truth.t


@pytest.mark.parametrize("form", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("target", ["adamhd", "adamc"])
def test_torch_adamw_state_switches_into_adamhd_and_adamc(form, target):
    ps = _params()
    truth = Truth(ps)
    first = _torch_adam(ps, form, **OLD)
    for t in range(K):
        _step(first, ps, t)
        truth.adamw(_grads(t, ps), **OLD)
    if target == "adamhd":
        second = AdamHD(_groups(ps), **NEW, **HD)
    else:
        second = AdamC(_groups(ps), **NEW, max_lr=MAX_LR)
    second.load_state_dict(first.state_dict())
    for g in second.param_groups:                       # the new optimizer's hyperparameters, not AdamW's
        assert g["betas"] == NEW["betas"] and g["eps"] == NEW["eps"] and "amsgrad" not in g
    assert all(st["step"].dtype == torch.float32 and st["step"].device == p.device and "delta_mu" not in st
               for p, st in second.state.items())
    for t in range(AFTER):
        for g in second.param_groups:
            g["lr"] = _lr(t)
        _step(second, ps, K + t)
        hyper = dict(NEW, lr=_lr(t))
        if target == "adamhd":
            truth.adamhd(_grads(K + t, ps), **hyper, **HD)
        else:
            truth.adamc(_grads(K + t, ps), **hyper, max_lr=MAX_LR)
    _check(ps, second, truth)
    if target == "adamhd":   # μ started from the weights at the switch and followed its EMA
        for i, p in enumerate(ps):
            if truth.decayed[i]:
                assert_close(second.state[p]["delta_mu"], truth.mu[i], dtype=torch.float32)


@pytest.mark.parametrize("form", ["fused", "foreach", "for-loop"])
def test_torch_adam_with_amsgrad_switches_dropping_the_running_max_with_a_warning(form):
    ps = _params()
    first = _torch_adam(ps, form, kind="adam", amsgrad=True, lr=0.02)
    _step(first, ps, 0)
    second = AdamHD(_groups(ps), lr=0.01)
    with pytest.warns(UserWarning, match="max_exp_avg_sq"):
        second.load_state_dict(first.state_dict())
    assert all(sorted(st) == ["exp_avg", "exp_avg_sq", "step"] for st in second.state.values())


@pytest.mark.parametrize("form", ["fused", "foreach", "for-loop"])
@pytest.mark.parametrize("source", ["adamhd", "adamc"])
def test_our_state_switches_into_torch_adamw_dropping_mu(form, source):
    ps = _params()
    truth = Truth(ps)
    if source == "adamhd":
        first = AdamHD(_groups(ps), **OLD, **HD)
    else:
        first = AdamC(_groups(ps), **OLD, max_lr=OLD["lr"])      # constant lr: AdamC is AdamW here
    for t in range(K):
        _step(first, ps, t)
        if source == "adamhd":
            truth.adamhd(_grads(t, ps), **OLD, **HD)
        else:
            truth.adamw(_grads(t, ps), **OLD)
    second = _torch_adam(ps, form, **NEW)
    fusedecay.load_adam_state(second, first.state_dict())
    for g in second.param_groups:
        assert g["betas"] == NEW["betas"] and g["lr"] == NEW["lr"] and "delta_mode" not in g
    assert all("delta_mu" not in st for st in second.state.values())
    for t in range(AFTER):
        _step(second, ps, K + t)
        truth.adamw(_grads(K + t, ps), **NEW)
    _check(ps, second, truth)


def test_adamhd_and_adamc_switch_into_each_other():
    ps = _params()
    hd = AdamHD(_groups(ps), **OLD, **HD)
    _step(hd, ps, 0)
    c = AdamC(_groups(ps), **NEW, max_lr=MAX_LR)
    c.load_state_dict(hd.state_dict())
    assert c.param_groups[0]["weight_decay"] == NEW["weight_decay"] and "delta_mode" not in c.param_groups[0]
    for p in ps:
        if p.numel():
            assert torch.equal(c.state[p]["exp_avg"], hd.state[p]["exp_avg"]) and "delta_mu" not in c.state[p]
    back = AdamHD(_groups(ps), **NEW)
    back.load_state_dict(c.state_dict())
    assert back.param_groups[0]["delta_mode"] == "ema" and back.param_groups[0]["lr"] == NEW["lr"]


def test_switch_casts_moments_to_the_new_moment_dtype_and_matches_by_param_names():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3)).to(torch.bfloat16)
    first = torch.optim.AdamW(fusedecay.param_groups(model, "adamw", output=None), lr=0.01)
    model(torch.randn(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    first.step()
    # a different group structure and param order; param_names on both sides match them up
    named = list(model.named_parameters())[::-1]
    second = AdamHD([{"params": [p for _, p in named], "param_names": [n for n, _ in named]}], lr=0.01,
                    moment_dtype=torch.float32)
    second.load_state_dict(first.state_dict())
    for n, p in named:
        assert second.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(second.state[p]["exp_avg"], first.state[p]["exp_avg"].float()), n


def _snapshot(opt, ps):
    return ([p.detach().clone() for p in ps],
            {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()})


def _assert_unchanged(opt, ps, snap):
    params, state = snap
    assert all(torch.equal(p.detach(), q) for p, q in zip(ps, params))
    assert {id(p) for p in opt.state} == set(state)
    for p, st in opt.state.items():
        assert sorted(st) == sorted(state[id(p)]) and all(torch.equal(v, state[id(p)][k]) for k, v in st.items())


@pytest.mark.parametrize("target", [AdamHD, AdamC])
def test_scionc_state_into_adam_raises_naming_what_is_missing_and_changes_nothing(target):
    ps = [p for p in _params() if p.ndim == 2]
    scion = ScionC(ps, lr=0.01)
    _step(scion, ps, 0)
    opt = target(ps, lr=0.01)
    _step(opt, ps, 1)
    snap = _snapshot(opt, ps)
    with pytest.raises(ValueError, match=r"not an Adam's: it lacks \['step', 'exp_avg', 'exp_avg_sq'\]"):
        opt.load_state_dict(scion.state_dict())
    _assert_unchanged(opt, ps, snap)
    with pytest.raises(ValueError, match="momentum_buffer"):
        fusedecay.load_adam_state(torch.optim.AdamW(ps), scion.state_dict())


def test_load_adam_state_rejects_other_optimizers():
    with pytest.raises(TypeError, match="load_adam_state"):
        fusedecay.load_adam_state(torch.optim.SGD(_params(), lr=0.1), {"state": {}, "param_groups": []})


def test_switch_needs_the_same_number_of_params():
    ps = _params()
    first = torch.optim.AdamW(ps[:2])
    _step(first, ps[:2], 0)
    opt = AdamHD(ps, lr=0.01)
    snap = _snapshot(opt, ps)
    with pytest.raises(ValueError, match="holds 2 params, this optimizer 4"):
        opt.load_state_dict(first.state_dict())
    _assert_unchanged(opt, ps, snap)


def test_no_warning_when_nothing_is_dropped():
    ps = _params()
    first = torch.optim.AdamW(ps)
    _step(first, ps, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdamC(ps).load_state_dict(first.state_dict())


def test_switch_keeps_the_optimizers_own_group_objects():
    """A tensor lr that a scheduler writes into (or a CUDA graph reads) is still the one the groups hold."""
    ps = _params()
    first = torch.optim.AdamW(_groups(ps))
    _step(first, ps, 0)
    lr = torch.tensor(0.01)
    opt = AdamC(_groups(ps), lr=lr)
    groups = opt.param_groups
    opt.load_state_dict(first.state_dict())
    assert opt.param_groups is groups and opt.param_groups[0]["lr"] is lr


def _state8_run():
    """AdamHD with 8-bit moments on an eligible matrix (2 × 4096) after K steps, and its state dict."""
    p = torch.nn.Parameter(torch.randn(2, 4096, generator=torch.Generator().manual_seed(3)))
    opt = AdamHD([p], lr=0.01, weight_decay=0.1, state_bits=8)
    for t in range(K):
        p.grad = _grads(t, [p])[0]
        opt.step()
    assert "exp_avg_codes" in opt.state[p]
    return p, opt.state_dict()


@pytest.mark.parametrize("target", ["adamc", "torch-adamw"])
def test_switch_from_8bit_state_carries_the_decoded_moments(target):
    """AdamHD's 8-bit moments switch into AdamC (full precision) or torch's AdamW as their decoded values
    (codes × scales, the storage contract), with the step; μ is dropped."""
    from fusedecay.reference import state8

    p, sd = _state8_run()
    st = sd["state"][0]
    want_m = state8.dequantize_exp_avg(st["exp_avg_codes"], st["exp_avg_scales"])
    want_v = state8.dequantize_exp_avg_sq(st["exp_avg_sq_codes"], st["exp_avg_sq_scales"])
    q = torch.nn.Parameter(p.detach().clone())
    if target == "adamc":
        new = AdamC([q], lr=0.01, weight_decay=0.1)
        new.load_state_dict(sd)
    else:
        new = torch.optim.AdamW([q], lr=0.01)
        fusedecay.load_adam_state(new, sd)
    got = new.state[q]
    assert set(got) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(got["exp_avg"], want_m) and torch.equal(got["exp_avg_sq"], want_v)
    assert float(got["step"]) == K
    assert want_m.abs().sum() > 0


def test_state_with_moments_in_two_formats_raises_and_changes_nothing():
    p, sd = _state8_run()
    opt = AdamHD([p], lr=0.01, weight_decay=0.1, state_bits=8)
    opt.load_state_dict(sd)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    bad = {"state": {0: dict(sd["state"][0], exp_avg=torch.zeros(2, 4096), exp_avg_sq=torch.zeros(2, 4096))},
           "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="two formats"):
        opt.load_state_dict(bad)
    half = {"state": {0: {k: v for k, v in sd["state"][0].items() if k != "exp_avg_sq_scales"}},
            "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match=r"lacks \['exp_avg_sq_scales'\]"):
        opt.load_state_dict(half)
    assert all(torch.equal(opt.state[p][k], v) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_switch_between_8bit_optimizers_keeps_codes_and_scales(dtype):
    """AdamHD(state_bits=8) → AdamC(state_bits=8): the moments are decoded and encoded again, and the codec is
    idempotent on its own values, so codes and scales come back bit for bit (bf16 params included: no bf16 detour)."""
    p = torch.nn.Parameter(torch.randn(2, 4096, generator=torch.Generator().manual_seed(3)).to(dtype))
    src = AdamHD([p], lr=0.01, weight_decay=0.1, state_bits=8)
    for t in range(K):
        p.grad = _grads(t, [p])[0].to(dtype)
        src.step()
    sd = src.state_dict()
    q = torch.nn.Parameter(p.detach().clone())
    new = AdamC([q], lr=0.01, weight_decay=0.1, state_bits=8)
    new.load_state_dict(sd)
    for k in ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales"):
        assert torch.equal(new.state[q][k], sd["state"][0][k]), k
    assert float(new.state[q]["step"]) == K


def test_switch_from_malformed_8bit_state_raises_naming_the_field_and_changes_nothing():
    p, sd = _state8_run()
    q = torch.nn.Parameter(p.detach().clone())
    new = AdamC([q], lr=0.01, weight_decay=0.1)
    st = sd["state"][0]
    cases = [({k: v for k, v in st.items() if k != "exp_avg_scales"}, r"lack 'exp_avg_scales'"),
             (dict(st, exp_avg_sq_codes=st["exp_avg_sq_codes"][:, :100]), r"'exp_avg_sq_codes' .* has shape"),
             (dict(st, exp_avg_codes=st["exp_avg_codes"].to(torch.uint8)), r"'exp_avg_codes' .* has dtype")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            new.load_state_dict({"state": {0: bad}, "param_groups": sd["param_groups"]})
        assert not new.state
