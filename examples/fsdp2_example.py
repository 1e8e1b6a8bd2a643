"""Train a small MLP language model with FSDP2 and a fusedecay optimizer, checkpointing with DCP.

    torchrun --nproc_per_node=2 examples/fsdp2_example.py --optim scionc
    torchrun --nproc_per_node=2 examples/fsdp2_example.py --optim adamhd --steps 40 --ckpt /tmp/fd_ckpt

CPU + gloo by default; CUDA + NCCL when every rank has a GPU. Nothing distributed is configured on
the optimizer: FSDP2 makes the params DTensors and fusedecay handles them (see docs/dist.md).
With ``--ckpt DIR`` the run saves a distributed checkpoint at ``--save-at`` and, if DIR already holds
one, resumes from it first.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from fusedecay import AdamC, AdamHD, ScionC


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab=257, d=64, depth=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def make_optimizer(model, name):
    hidden = [p for b in model.blocks for p in (b.up.weight, b.down.weight)]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    if name == "scionc":  # spectral hidden matrices; sign for embedding/head (uncorrected); bias LMO for 1-D
        return ScionC([dict(params=hidden, lmo="spectral", radius=3.0),
                       dict(params=[model.emb.weight, model.head.weight], lmo="sign", radius=300.0,
                            corrected=False, weight_decay=0.1),
                       dict(params=vectors, lmo="bias", radius=1.0)], lr=0.02, momentum=0.1)
    groups = [dict(params=hidden + [model.head.weight]), dict(params=vectors + [model.emb.weight], weight_decay=0.0)]
    if name == "adamhd":
        return AdamHD(groups, lr=3e-3, weight_decay=0.1)  # ema δ = mean|θ| of the whole (unsharded) layer
    return AdamC(groups, lr=3e-3, weight_decay=0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optim", choices=("adamhd", "adamc", "scionc"), default="adamhd")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ckpt", default=None, help="directory for a torch.distributed.checkpoint")
    ap.add_argument("--save-at", type=int, default=10)
    args = ap.parse_args()

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)
    model = TinyLM().to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model, args.optim)

    start = 0
    if args.ckpt and os.path.exists(os.path.join(args.ckpt, ".metadata")):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": 0}
        dcp.load(state, checkpoint_id=args.ckpt)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.ckpt} at step {start}")

    data = torch.Generator().manual_seed(1234)
    for step in range(args.steps):
        # Synthetic task: map each token t to (t + 1) mod vocab. Every rank draws the same global batch
        # and keeps its slice.
        x = torch.randint(0, 257, (8 * world, 32), generator=data)
        if step < start:
            continue
        x = x.chunk(world)[rank].to(device)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), ((x + 1) % 257).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}")  # logging only, outside step()
        if args.ckpt and step + 1 == args.save_at and start == 0:
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
                      "step": step + 1}, checkpoint_id=args.ckpt)
            if rank == 0:
                print(f"saved {args.ckpt} after step {step + 1}")
    dist.barrier()  # let every rank finish its last collective before the process group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
