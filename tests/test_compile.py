"""torch.compile: the README's compiled training step, forward + backward + optimizer.step(), on the CPU.

* It matches the same steps run eagerly (the README snippet with torch.compile made the identity) over 8 steps, params
  and optimizer state, within the fp32 tolerance of tests/tolerances.py (inductor fuses the model's element-wise
  ops, so grads differ from eager's in the last bits; the optimizer math is the same kernel).
* A cosine scheduler changes the tensor lr every step, and nothing recompiles after warm-up: dynamo's count of
  compiled graphs is the same after step 2 and after step 8.
* optimizer.step() is traced into one graph that holds the fused update as the opaque custom op
  ``torch.ops.fusedecay.adam_decay_`` together with the step-counter increments around it (not run eagerly
  behind a graph break), and the op has the Meta kernel FakeTensor tracing needs.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from fusedecay import AdamC, ScionC, backends
from snippets import python_block
from tolerances import assert_close

STEPS, WARMUP = 8, 2


@pytest.fixture(scope="module", autouse=True)
def _private_inductor_cache(tmp_path_factory):
    """A fresh inductor cache for this module. torch's on-disk cache (/tmp/torchinductor_<user>) is not keyed on
    ATEN_CPU_CAPABILITY: after a run under the default capability, a run under ATEN_CPU_CAPABILITY=default reuses
    vectorised code and fails to compile it ("'at::vec' has not been declared"), and CI runs the suite under both."""
    import os
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _readme_step(compiled: bool, seed: int = 0):
    """The README's torch.compile snippet in its own namespace; ``compiled=False`` runs it with torch.compile = id."""
    ns = {}
    torch.manual_seed(seed)
    code = python_block("README.md", "### torch.compile")
    if compiled:
        exec(code, ns)
    else:
        real = torch.compile
        torch.compile = lambda fn=None, **kw: fn
        try:
            exec(code, ns)
        finally:
            torch.compile = real
    return ns


def _swap_optimizer(ns, name):
    """Replace the snippet's AdamHD with AdamC or ScionC (same model, a tensor lr, the same cosine schedule)."""
    if name == "adamhd":
        return
    params = list(ns["model"].parameters())
    mats, vecs = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    if name == "adamc":
        opt = AdamC([{"params": mats}, {"params": vecs, "weight_decay": 0.0}], lr=torch.tensor(1e-3), weight_decay=0.1)
    else:
        opt = ScionC([{"params": mats, "lmo": "spectral", "radius": 50.0},
                      {"params": vecs, "lmo": "bias", "radius": 50.0, "corrected": False}],
                     lr=torch.tensor(2.0 ** -10), momentum=0.1)
    ns["opt"] = opt  # train_step reads the global at call time
    ns["sched"] = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


@pytest.mark.parametrize("name", ["adamhd", "adamc", "scionc"])
def test_compiled_train_step_matches_eager_and_does_not_recompile_when_lr_changes(name):
    torch._dynamo.reset()
    counters.clear()
    comp, eager = _readme_step(True), _readme_step(False)
    _swap_optimizer(comp, name)
    _swap_optimizer(eager, name)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)) for _ in range(STEPS)]
    lrs, graphs = [], []
    for x, y in batches:
        for ns in (comp, eager):
            ns["train_step"](x, y)
            ns["sched"].step()
        lr = comp["opt"].param_groups[0]["lr"]
        assert isinstance(lr, torch.Tensor)
        lrs.append(lr.item())
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(lrs)) == STEPS, f"the schedule did not change the lr every step: {lrs}"
    assert graphs[0] >= 2, f"expected compiled graphs for the model and the step, dynamo counted {graphs[0]}"
    assert graphs[WARMUP - 1:] == [graphs[WARMUP - 1]] * (STEPS - WARMUP + 1), \
        f"recompiled after warm-up: compiled graphs per step {graphs}"
    for (pname, p), q in zip(comp["model"].named_parameters(), eager["model"].parameters()):
        assert_close(p.detach(), q.detach(), msg=f"{name}: param {pname}")
        sp, sq = comp["opt"].state[p], eager["opt"].state[q]
        assert sp.keys() == sq.keys() and sp, f"{name}: state keys of {pname}"
        for key in sp:
            assert_close(sp[key], sq[key], msg=f"{name}: state {key!r} of {pname}")


def test_step_is_one_graph_with_the_fused_op_inside(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(backends, "_plugins_loaded", False)  # as in a fresh process: nothing loaded yet
    ns = _readme_step(False)  # the snippet's model and optimizer; only opt.step() is compiled here
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step = torch.compile(ns["opt"].step, backend=record)
    for _ in range(3):
        torch.nn.functional.mse_loss(ns["model"](torch.randn(4, 64)), torch.randn(4, 64)).backward()
        step()
        ns["opt"].zero_grad()
    targets = [{str(n.target) for n in gm.graph.nodes if n.op == "call_function"} for gm in graphs]
    # The step increment: torch's foreach add, the extension's one-call _increment_steps_, or — the CPU kernel —
    # inside the op itself (increment_steps=True; its schema marks the steps as written).
    inside = backends.resolve("auto", torch.device("cpu"), torch.float32).increments_steps
    whole = [t for t in targets if "fusedecay.adam_decay_" in t
             and (inside or any("_foreach_add_" in x or "_increment_steps_" in x for x in t))]
    assert whole, f"no graph holds both the step increments and the fused op: {targets}"
    steps = {float(st["step"]) for st in ns["opt"].state.values()}
    assert steps == {3.0}, f"3 compiled steps left the step counters at {steps}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedecay::adam_decay_", "Meta")


def test_step_wrapper_traces_without_a_graph_break():
    """With its state made (two eager steps), AdamHD's compiled step is one graph: the step wrapper
    (fusedecay/_step_wrapper.py: hooks, grad mode, the profiler range) holds nothing dynamo breaks on."""
    torch._dynamo.reset()
    ns = _readme_step(False)
    opt, model = ns["opt"], ns["model"]

    def grads():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(torch.randn(4, 64)), torch.randn(4, 64)).backward()

    for _ in range(2):
        grads()
        opt.step()
    graphs = []
    # type(opt).step: the class's step itself, not the lr scheduler's wrapper around the bound method (which dynamo
    # skips, a graph break of torch's)
    step = torch.compile(lambda: type(opt).step(opt), backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    torch._dynamo.utils.counters.clear()
    for _ in range(2):
        grads()
        step()
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert len(graphs) == 1 and any("fusedecay.adam_decay_" in str(n.target) for n in graphs[0].graph.nodes)
