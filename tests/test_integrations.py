"""The README's Hugging Face Trainer and Lightning snippets (and docs/integrations.md's role groups), run as written.

Each framework trains a tiny model for 4 steps with AdamHD, AdamC and ScionC using its own scheduler and gradient
clipping, checkpoints after step 2 and resumes from that checkpoint in a fresh trainer whose model starts from
different weights. Checked: the optimizer state right after the resume equals the state saved at step 2, and the
final params and optimizer state equal those of an uninterrupted 4-step run, bit for bit (the same ops on the same
data: bit-identity is the right bar). Truth is the framework's own uninterrupted run, not our code.

transformers and lightning are test dependencies (``pip install -e ".[test]"``); under CI a missing one fails
these tests instead of skipping them (tests/snippets.py).
"""
import copy
import math
import os

import pytest
import torch

from snippets import python_block, require

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may be downloaded: the model is built from a config
os.environ["TRANSFORMERS_OFFLINE"] = "1"

STEPS, SAVE_AT, BATCH, SAMPLES, SEQ, VOCAB = 4, 2, 4, 8, 16, 64  # 2 batches per epoch: the checkpoint ends epoch 0


def _snippet(heading, relpath="README.md"):
    ns = {}
    exec(python_block(relpath, heading), ns)
    return ns


def _state_snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def assert_same_state(a, b, what):
    """Two optimizer state_dicts are equal: every tensor bit for bit (and dtype), every other value ==."""
    assert a["state"].keys() == b["state"].keys(), what
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        assert sa.keys() == sb.keys(), f"{what}: param {k} state keys {sorted(sa)} vs {sorted(sb)}"
        assert sa, f"{what}: param {k} has no state"
        for name in sa:
            x, y = sa[name], sb[name]
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: param {k} state {name!r} differs"
            else:
                assert x == y, f"{what}: param {k} state {name!r}: {x!r} vs {y!r}"
    assert len(a["param_groups"]) == len(b["param_groups"]), what
    for i, (ga, gb) in enumerate(zip(a["param_groups"], b["param_groups"])):
        assert ga.keys() == gb.keys(), f"{what}: group {i} keys"
        for key in ga:
            x, y = ga[key], gb[key]
            same = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
            assert same, f"{what}: group {i} {key!r}: {x!r} vs {y!r}"


def assert_same_params(a, b, what):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"{what}: {name} differs"


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face Trainer
# ---------------------------------------------------------------------------------------------------------------
class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, VOCAB, (SAMPLES, SEQ), generator=g)

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _unwrap(x):
    """The torch object inside accelerate's AcceleratedOptimizer / AcceleratedScheduler wrappers."""
    return getattr(x, "optimizer", None) if type(x).__name__ == "AcceleratedOptimizer" else getattr(x, "scheduler", x)


def _gpt2(seed):
    transformers = require("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _hf_optimizers():
    readme = _snippet("### Hugging Face Trainer")
    docs = _snippet("## Param groups by role", "docs/integrations.md")
    return readme["FusedecayTrainer"], {
        "adamhd": (readme["adamhd"], 1e-2),                                        # the README's, as written
        "adamc": (lambda model, args: docs["adamc"](model, args.learning_rate, args.weight_decay), 1e-2),
        "scionc": (lambda model, args: docs["scionc"](model, args.learning_rate), 2.0 ** -8),
    }


MAX_GRAD_NORM = 0.25  # small enough that the Trainer's clipping acts at some step (checked below)


@pytest.mark.parametrize("name", ["adamhd", "adamc", "scionc"])
def test_hf_trainer_trains_with_its_scheduler_and_clipping_and_resumes_bit_identically(name, tmp_path):
    transformers = require("transformers")
    trainer_cls, builders = _hf_optimizers()
    make_optimizer, lr = builders[name]
    seen = {"lr": [], "clipped_norm": [], "at_save": None, "at_resume": None}

    class Probe(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # after clipping, before step()
            norms = [p.grad.norm() for p in model.parameters() if p.grad is not None]
            seen["clipped_norm"].append(torch.stack(norms).norm().item())

        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen["lr"].append(optimizer.param_groups[0]["lr"])
            if state.global_step == SAVE_AT:
                seen["at_save"] = _state_snapshot(optimizer)

        def on_train_begin(self, args, state, control, optimizer=None, **kw):  # after a resume has loaded the state
            if state.global_step:
                seen["at_resume"] = _state_snapshot(optimizer)

    def run(out, seed, resume=None):
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=lr,
            weight_decay=0.1, lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM,
            save_strategy="steps", save_steps=SAVE_AT, logging_steps=1, report_to="none", use_cpu=True, seed=0,
            disable_tqdm=True, dataloader_num_workers=0)
        model = _gpt2(seed)
        trainer = trainer_cls(model=model, args=args, train_dataset=_TokenDataset(), make_optimizer=make_optimizer,
                              callbacks=[Probe()])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", seed=0)
    opt = _unwrap(full.optimizer)  # accelerate wraps it
    assert type(opt).__name__.lower() == name  # ours, not the Trainer's default
    sched = _unwrap(full.lr_scheduler)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR) and _unwrap(sched.optimizer) is opt
    # The Trainer's cosine schedule drove the lr (seen after each step: cosine from lr over 4 steps).
    expected = [lr * 0.5 * (1 + math.cos(math.pi * s / STEPS)) for s in range(1, STEPS + 1)]
    assert seen["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12), seen["lr"]
    # Its clipping ran before our step(): the norm step() saw is at most max_grad_norm, and it cut a larger one.
    logged = [h["grad_norm"] for h in full.state.log_history if "grad_norm" in h]
    assert len(seen["clipped_norm"]) == STEPS and max(seen["clipped_norm"]) <= MAX_GRAD_NORM * (1 + 1e-4)
    assert max(float(g) for g in logged) > MAX_GRAD_NORM, logged
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (ckpt / "optimizer.pt").is_file()

    saved = seen["at_save"]
    seen["at_save"] = None
    resumed = run(tmp_path / "resumed", seed=1, resume=str(ckpt))  # other initial weights: all must come back
    assert seen["at_resume"] is not None, "the resumed run did not start from the checkpoint's step"
    assert_same_state(seen["at_resume"], saved, f"{name}: state right after resume vs at step {SAVE_AT}")
    assert_same_params(resumed.model, full.model, f"{name}: params after resume + {STEPS - SAVE_AT} steps")
    assert_same_state(_unwrap(resumed.optimizer).state_dict(), opt.state_dict(),
                      f"{name}: final state, resumed vs uninterrupted")


# ---------------------------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------------------------
class _TinyLM(torch.nn.Module):
    """Embedding → hidden matrix → norm → output layer: one param of each role."""

    def __init__(self, seed, vocab=VOCAB, width=16):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, x):
        return self.out(self.norm(torch.relu(self.hidden(self.embed(x)))))


def _lit_classes():
    lit_lm = _snippet("### Lightning")["LitLM"]
    from fusedecay import AdamHD, ScionC

    def per_step_cosine(opt, total_steps):
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class LitAdamHD(lit_lm):  # the README's module with AdamHD in AdamC's place
        def configure_optimizers(self):
            params = [p for p in self.model.parameters() if p.requires_grad]
            return per_step_cosine(AdamHD([{"params": [p for p in params if p.ndim >= 2]},
                                           {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                          lr=self.lr, weight_decay=self.weight_decay), self.total_steps)

    class LitScionC(lit_lm):  # ScionC's LMO per role (docs/integrations.md)
        def configure_optimizers(self):
            m = self.model
            return per_step_cosine(ScionC(
                [{"params": [m.hidden.weight], "lmo": "spectral", "radius": 50.0},
                 {"params": [m.embed.weight, m.out.weight], "lmo": "sign", "radius": 3000.0, "corrected": False,
                  "weight_decay": 1.0},
                 {"params": [m.hidden.bias, m.norm.weight, m.norm.bias], "lmo": "bias", "radius": 50.0,
                  "corrected": False}], lr=self.lr, momentum=0.1), self.total_steps)

    return {"adamc": (lit_lm, 1e-2), "adamhd": (LitAdamHD, 1e-2), "scionc": (LitScionC, 2.0 ** -8)}


@pytest.mark.parametrize("name", ["adamhd", "adamc", "scionc"])
def test_lightning_step_closure_scheduler_and_resume_restore_state_bit_identically(name, tmp_path):
    L = require("lightning")
    cls, lr = _lit_classes()[name]
    # One batch per epoch. Lightning (2.6) resumes a plain DataLoader from an epoch-end checkpoint by restarting it
    # and running one more batch of the old epoch (the first batch again) before the next epoch: with several
    # batches the resumed run sees its data in another order, which would hide what this test checks.
    g = torch.Generator().manual_seed(99)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:]),
                                         batch_size=BATCH, shuffle=False)
    events = {"closure_calls": 0, "lrs": [], "at_start": None, "at_save": None}

    class Probe(cls):
        def training_step(self, batch, batch_idx):  # runs inside the closure Lightning hands to step()
            events["closure_calls"] += 1
            return super().training_step(batch, batch_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            events["lrs"].append(float(self.trainer.optimizers[0].param_groups[0]["lr"]))

        def on_train_epoch_end(self):
            if self.trainer.global_step == SAVE_AT:  # what the epoch-end checkpoint below saves
                events["at_save"] = _state_snapshot(self.trainer.optimizers[0])

        def on_train_start(self):  # after Lightning restored a checkpoint's optimizer and scheduler state
            events["at_start"] = _state_snapshot(self.trainer.optimizers[0])

    def trainer(**kw):
        return L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0, **kw)

    # Uninterrupted, saving a checkpoint at every epoch end (= every step).
    full = Probe(_TinyLM(seed=0), lr=lr, total_steps=STEPS)
    every_epoch = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1,
                                                      every_n_epochs=1, save_on_train_epoch_end=True)
    trainer(callbacks=[every_epoch]).fit(full, loader)
    assert events["closure_calls"] == STEPS
    assert events["lrs"] == pytest.approx([lr * 0.5 * (1 + math.cos(math.pi * s / STEPS)) for s in range(1, STEPS + 1)])
    assert type(full.trainer.optimizers[0]).__name__.lower() == name
    ckpt = tmp_path / f"step={SAVE_AT}.ckpt"
    assert ckpt.is_file(), sorted(os.listdir(tmp_path))

    resumed = Probe(_TinyLM(seed=1), lr=lr, total_steps=STEPS)  # other initial weights: all must come back
    events["closure_calls"] = 0
    trainer(enable_checkpointing=False).fit(resumed, loader, ckpt_path=str(ckpt))
    assert events["closure_calls"] == STEPS - SAVE_AT
    assert_same_state(events["at_start"], events["at_save"], f"{name}: state right after ckpt_path restore vs saved")
    assert_same_params(resumed.model, full.model, f"{name}: params after resume + {STEPS - SAVE_AT} steps")
    assert_same_state(resumed.trainer.optimizers[0].state_dict(), full.trainer.optimizers[0].state_dict(),
                      f"{name}: final state, resumed vs uninterrupted")
