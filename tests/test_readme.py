"""The README's first usage example runs as written and trains."""
import os
import re

import torch

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks, "README has no python example"
    ns = {}
    exec(blocks[0], ns)
    model, opt, sched = ns["model"], ns["opt"], ns["sched"]
    torch.manual_seed(0)
    x = torch.randn(8, 2, 256)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    assert all("delta_mu" in opt.state[p] for p in ns["decay"])
    assert all("delta_mu" not in opt.state[p] for p in ns["no_decay"])  # wd = 0: nothing to track
