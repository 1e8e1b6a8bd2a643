"""One training run: the same model init, batches and lr schedule for whichever optimizer is given."""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import param_roles
from .corpus import train_batches
from .model import GPT, GPTConfig
from .optimizers import LABELS, Hyper, build_optimizer, hidden_decay, lr_lambda


def autocast(device: torch.device):
    # bf16 matmuls on GPU (params, optimizer state and the loss stay fp32); plain fp32 on CPU.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: GPT, batches: List[Tuple[Tensor, Tensor]]) -> float:
    """Mean cross-entropy (nats per byte) over a fixed list of batches."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    with autocast(device):
        for x, y in batches:
            total += model.loss(x, y).item()
    model.train(was_training)
    return total / len(batches)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(name: str, cfg: GPTConfig, hp: Hyper, train_data: Tensor, val_set: List[Tuple[Tensor, Tensor]], *,
              steps: int, batch_size: int, seq_len: int, seed: int, eval_every: int, device: torch.device,
              progress: bool = True) -> Tuple[GPT, Dict]:
    """Train a fresh model (init from ``seed``) with optimizer ``name``; returns (model, history).

    history: per-step train loss, lr multiplier, step wall time (forward+backward+optimizer) and
    optimizer-step time, total and per-layer gradient norms (before the step) and weight norms (after);
    validation loss at step 0, every ``eval_every`` steps and at the end.
    """
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    opt = build_optimizer(name, model, hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, hp.warmup_frac))
    tracked = [(n, p) for role in ("hidden", "embedding", "output") for n, p in param_roles(model)[role]]
    names = [n for n, _ in tracked]
    tensors = [p for _, p in tracked]
    all_params = list(model.parameters())

    hist: Dict = {"train_loss": [], "lr_mult": [], "hidden_decay": [], "step_time_s": [], "opt_time_s": [],
                  "grad_norm_total": [],
                  "val_step": [0], "val_loss": [evaluate(model, val_set)], "layers": names,
                  "weight_norm": {n: [] for n in names}, "grad_norm": {n: [] for n in names}}
    batches = train_batches(train_data, batch_size, seq_len, seed)
    bar = tqdm(range(steps), desc=f"{LABELS[name]:>13}", disable=not progress, dynamic_ncols=True, leave=True)
    start = time.perf_counter()
    for step in bar:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr_mult = sched.get_last_lr()[0] / sched.base_lrs[0]
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            loss = model.loss(x, y)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        grads = [p.grad for p in all_params if p.grad is not None]
        g_total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        g_layer = torch.stack(torch._foreach_norm([p.grad for p in tensors]))
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sched.step()
        w_layer = torch.stack(torch._foreach_norm([p.detach() for p in tensors]))
        loss_v = loss.item()
        hist["train_loss"].append(loss_v)
        hist["lr_mult"].append(lr_mult)
        hist["hidden_decay"].append(hidden_decay(name, hp, lr_mult))
        hist["step_time_s"].append((t1 - t0) + (t3 - t2))
        hist["opt_time_s"].append(t3 - t2)
        hist["grad_norm_total"].append(g_total.item())
        for n, g, w in zip(names, g_layer.tolist(), w_layer.tolist()):
            hist["grad_norm"][n].append(g)
            hist["weight_norm"][n].append(w)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            hist["val_step"].append(step + 1)
            hist["val_loss"].append(evaluate(model, val_set))
            bar.set_postfix(loss=f"{loss_v:.3f}", val=f"{hist['val_loss'][-1]:.3f}")
    hist["wall_time_s"] = time.perf_counter() - start
    hist["final_val_loss"] = hist["val_loss"][-1]
    return model, hist
