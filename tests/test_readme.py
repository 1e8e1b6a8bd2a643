"""The README's first usage example runs as written, prints the summary the README shows, and trains."""
import contextlib
import io
import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_usage_example_runs_and_prints_the_summary_shown():
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    ns = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(blocks[0], ns)
    shown = re.search(r"```python\n.*?```\n\nprints\n\n```\n(.*?)```", text, re.S)
    assert shown, "README's first example is not followed by the summary it prints"
    assert out.getvalue() == shown.group(1)

    model, opt, sched = ns["model"], ns["opt"], ns["sched"]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 16))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    decayed = [p for g in opt.param_groups if g["weight_decay"] != 0 for p in g["params"]]
    undecayed = [p for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert {p.ndim for p in decayed} == {2} and {p.ndim for p in undecayed} == {1}
    assert all("delta_mu" in opt.state[p] for p in decayed)
    assert all("delta_mu" not in opt.state[p] for p in undecayed)  # wd = 0: nothing to track
