"""fusedecay.param_groups / param_roles on the models a user brings: the demo's GPT (head tied functionally),
a transformers GPT-2 (head tied by assignment, Conv1D weights stored (d_in, d_out)), a model with an untied
head, a conv net and a small MoE with 3-D expert stacks.

The truth is written out per model below (which role each param has, what each optimizer's group must
say); every model's groups then build each optimizer and train a step.
"""
import re

import pytest
import torch
from torch import nn

from fusedecay import AdamC, AdamHD, ScionC, param_groups, param_roles
from fusedecay.demo.model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class UntiedLM(nn.Module):
    def __init__(self, vocab=37, d=12):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(9, d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.lm_head(self.norm(x))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 6, 3, bias=False), nn.GroupNorm(2, 6), nn.ReLU())
        self.seq = nn.Conv1d(6, 4, 2)   # a 3-D kernel: "flatten", not an expert "batch"
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        h = self.features(x).flatten(2)           # (B, 6, L)
        return self.fc(self.seq(h).mean(-1))


class MoE(nn.Module):
    """Token embedding, a router, experts as 3-D stacks (E, d_out, d_in), an RMSNorm and an untied head."""

    def __init__(self, vocab=23, d=8, d_ff=12, experts=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, d_ff, d) * 0.3)
        self.w_out = nn.Parameter(torch.randn(experts, d, d_ff) * 0.3)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed(idx)                                          # (B, T, d)
        gate = torch.softmax(self.router(x), -1)                      # (B, T, E)
        h = torch.einsum("btd,efd->btef", x, self.w_in).relu()
        y = torch.einsum("btef,edf->bted", h, self.w_out)
        x = x + (gate.unsqueeze(-1) * y).sum(-2)
        return self.head(self.norm(x))


def _gpt2():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _demo_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=40))


# The truth: every param's role, written out.
def _expected_roles(kind):
    if kind == "demo":
        hidden = [f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
        return dict(hidden=hidden, embedding=["wpe.weight"], output=["wte.weight"],
                    norm=[f"blocks.{i}.{n}.weight" for i in range(2) for n in ("ln1", "ln2")] + ["ln_f.weight"], bias=[])
    if kind == "gpt2":
        h = [f"transformer.h.{i}" for i in range(2)]
        mods = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        return dict(hidden=[f"{b}.{m}.weight" for b in h for m in mods], embedding=["transformer.wpe.weight"],
                    output=["transformer.wte.weight"],
                    norm=[f"{b}.{n}.{w}" for b in h for n in ("ln_1", "ln_2") for w in ("weight", "bias")]
                    + ["transformer.ln_f.weight", "transformer.ln_f.bias"],
                    bias=[f"{b}.{m}.bias" for b in h for m in mods])
    if kind == "untied":
        return dict(hidden=["fc1.weight", "fc2.weight"], embedding=["tok.weight", "pos.weight"], output=["lm_head.weight"],
                    norm=["norm.weight", "norm.bias"], bias=["fc1.bias", "fc2.bias"])
    if kind == "conv":
        return dict(hidden=["features.0.weight", "features.3.weight", "seq.weight"], embedding=[], output=["fc.weight"],
                    norm=["features.1.weight", "features.1.bias", "features.4.weight", "features.4.bias"],
                    bias=["features.0.bias", "seq.bias", "fc.bias"])
    if kind == "moe":
        return dict(hidden=["router.weight", "w_in", "w_out"], embedding=["embed.weight"], output=["head.weight"],
                    norm=["norm.weight"], bias=[])
    raise ValueError(kind)


# ScionC's matrix_view for the hidden weights that are not plain (d_out, d_in) matrices.
_EXPECTED_VIEWS = {
    "gpt2": {n: "transposed" for n in _expected_roles("gpt2")["hidden"]},
    "conv": {"features.0.weight": "flatten", "features.3.weight": "flatten", "seq.weight": "flatten"},
    "moe": {"w_in": "batch", "w_out": "batch"},
}

MODELS = {"demo": _demo_gpt, "gpt2": _gpt2, "untied": UntiedLM, "conv": ConvNet, "moe": MoE}


def _batch(kind, model):
    g = torch.Generator().manual_seed(1)
    if kind == "conv":
        return (torch.randn(2, 3, 6, 6, generator=g),)
    vocab = {"demo": 40, "gpt2": 50, "untied": 37, "moe": 23}[kind]
    return (torch.randint(0, vocab, (2, 5), generator=g),)


def _loss(kind, model, batch):
    out = model(*batch)
    out = out.logits if hasattr(out, "logits") else out
    return out.float().square().mean()


def _group_of(groups, name):
    hits = [g for g in groups if name in g["param_names"]]
    assert len(hits) == 1, (name, len(hits))
    return hits[0]


# ----------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
def test_roles_match_the_written_out_assignment(kind):
    model = MODELS[kind]()
    got = {r: sorted(n for n, _ in pairs) for r, pairs in param_roles(model).items()}
    assert got == {r: sorted(v) for r, v in _expected_roles(kind).items()}


def test_gpt2_output_is_the_tied_embedding_and_aliases_match():
    model = _gpt2()
    roles = param_roles(model)
    (name, w), = roles["output"]
    assert w is model.lm_head.weight is model.transformer.wte.weight
    # the tied alias names the same param: an override through it is that param's override
    groups = param_groups(model, "adamc", overrides={"lm_head.weight": {"lr": 1e-4}})
    assert _group_of(groups, name)["lr"] == 1e-4 and _group_of(groups, name)["corrected"] is False


def test_untied_head_found_whether_or_not_it_is_registered_last():
    class HeadFirst(UntiedLM):
        def __init__(self):
            super().__init__()
            self.final = nn.LayerNorm(12)     # the last module with params is a norm, not the head
    with pytest.raises(ValueError, match="could not find the output layer"):
        param_roles(HeadFirst())
    roles = param_roles(HeadFirst(), output="lm_head")   # a module name
    assert [n for n, _ in roles["output"]] == ["lm_head.weight"]
    roles = param_roles(HeadFirst(), output=None)
    assert roles["output"] == [] and "lm_head.weight" in [n for n, _ in roles["hidden"]]


def test_head_tied_by_assignment_is_found_without_a_protocol():
    class NanoGPTStyle(nn.Module):     # nanoGPT ties with `wte.weight = lm_head.weight`; lm_head is not last
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(11, 6)
            self.lm_head = nn.Linear(6, 11, bias=False)
            self.wte.weight = self.lm_head.weight
            self.fc = nn.Linear(6, 6)
            self.ln_f = nn.LayerNorm(6)
    model = NanoGPTStyle()
    roles = param_roles(model)
    assert [w for _, w in roles["output"]] == [model.lm_head.weight] and roles["embedding"] == []
    assert [n for n, _ in roles["hidden"]] == ["fc.weight"]
    groups = param_groups(model, "adamc", decay_embeddings=False)
    assert _group_of(groups, roles["output"][0][0])["weight_decay"] == 0.0     # the head is the embedding table


def test_functionally_tied_head_needs_get_output_embeddings_or_a_name():
    class NoProtocol(GPT):
        get_output_embeddings = None
    model = NoProtocol(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11))
    with pytest.raises(ValueError, match="output="):
        param_groups(model, "scionc")
    assert [n for n, _ in param_roles(model, output="wte.weight")["output"]] == ["wte.weight"]


def test_frozen_params_are_left_out_and_counted():
    model = UntiedLM()
    model.pos.weight.requires_grad_(False)
    groups = param_groups(model, "adamw")
    names = [n for g in groups for n in g["param_names"]]
    assert "pos.weight" not in names and len(names) == len(set(names)) == 8
    assert "frozen, not in any group: 1" in str(groups)


# ----------------------------------------------------------------------------------------------
# Groups per optimizer
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
def test_scionc_groups_by_role(kind):
    model = MODELS[kind]()
    groups = param_groups(model, "scionc")
    expected = _expected_roles(kind)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for v in expected.values() for n in v)     # each param exactly once
    for name in expected["hidden"]:
        g = _group_of(groups, name)
        assert (g["lmo"], g["corrected"], g["weight_decay"]) == ("spectral", True, 0.0), name
        assert g.get("matrix_view", "auto") == _EXPECTED_VIEWS.get(kind, {}).get(name, "auto"), name
    for name in expected["embedding"] + expected["output"]:
        g = _group_of(groups, name)
        assert (g["lmo"], g["corrected"]) == ("sign", False) and "weight_decay" not in g, name
    for name in expected["norm"] + expected["bias"]:
        g = _group_of(groups, name)
        assert (g["lmo"], g["corrected"], g["weight_decay"]) == ("bias", False, 0.0), name


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("opt", ["adamw", "adamhd", "adamc"])
def test_adam_decay_mask_and_uncorrected_output(kind, opt):
    model = MODELS[kind]()
    expected = _expected_roles(kind)
    for decay_embeddings in (True, False):
        groups = param_groups(model, opt, decay_embeddings=decay_embeddings)
        for role, names in expected.items():
            for name in names:
                g = _group_of(groups, name)
                tied = kind in ("demo", "gpt2") and role == "output"
                undecayed = role in ("norm", "bias") or (not decay_embeddings and (role == "embedding" or tied))
                assert (g.get("weight_decay") == 0.0) is undecayed, (name, role, decay_embeddings)
                if opt in ("adamhd", "adamc"):
                    assert g.get("corrected", opt == "adamc") is (opt == "adamc" and role != "output"), (name, role)
                else:
                    assert "corrected" not in g


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("opt", ["adamw", "adamhd", "adamc", "scionc"])
def test_groups_build_the_optimizer_and_train(kind, opt):
    model = MODELS[kind]()
    cls = {"adamw": torch.optim.AdamW, "adamhd": AdamHD, "adamc": AdamC, "scionc": ScionC}[opt]
    kw = dict(lr=0.01, weight_decay=0.1) if opt != "scionc" else dict(lr=0.01, weight_decay=0.1, momentum=0.5)
    optim = cls(param_groups(model, opt), **kw)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch(kind, model)
    for _ in range(2):
        optim.zero_grad()
        _loss(kind, model, batch).backward()
        optim.step()
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            assert not torch.equal(p.detach(), before[n]), f"{opt}: {n} did not move"


def test_options_and_overrides_shape_the_groups():
    model = MoE()
    groups = param_groups(model, "scionc",
                          options={"embedding": {"radius": 300.0}, "hidden": {"radius": 50.0}},
                          overrides={"router.weight": {"lmo": "sign", "corrected": False},      # a dict of options
                                     r"w_(in|out)": {"matrix_view": "flatten"},                 # a regex, in full
                                     lambda n, p: n == "head.weight": {"radius": 7.0}})         # a callable
    router = _group_of(groups, "router.weight")
    assert (router["lmo"], router["corrected"], router["radius"]) == ("sign", False, 50.0)
    assert _group_of(groups, "w_in")["matrix_view"] == "flatten" and _group_of(groups, "w_out") is _group_of(groups, "w_in")
    assert _group_of(groups, "embed.weight")["radius"] == 300.0
    assert _group_of(groups, "head.weight")["radius"] == 7.0 and "radius" not in _group_of(groups, "norm.weight")
    assert groups.roles["router.weight"] == "hidden"
    # a role override moves the param, and a param given role "output" stops the search for the head
    r = param_roles(model, overrides={"router.weight": "output"})
    assert [n for n, _ in r["output"]] == ["router.weight"] and "head.weight" in [n for n, _ in r["hidden"]]


@pytest.mark.parametrize("overrides, message", [
    ({"w_in": "hidden", r"w_.*": {"lr": 0.1}}, "named by two overrides"),
    ({"experts.w_in": "hidden"}, "matches no trainable param"),
    ({"w_": "hidden"}, "matches no trainable param"),                   # regexes match the whole name
    ({"w_in": "matrix"}, "unknown role"),
    ({"w_in": {"lmo_kind": "sign"}}, r"options \['lmo_kind'\]"),
    ({"w_in": 3}, "role name or a dict"),
    ({3: "hidden"}, "regex strings or callables"),
])
def test_bad_overrides_raise_naming_what_is_wrong(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        param_groups(MoE(), "scionc", overrides=overrides)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown optimizer"):
        param_groups(MoE(), "sgd")
    with pytest.raises(ValueError, match="unknown role"):
        param_groups(MoE(), "adamc", options={"gain": {"lr": 1.0}})
    with pytest.raises(ValueError, match=r"options \['momentum'\]"):
        param_groups(MoE(), "adamhd", options={"hidden": {"momentum": 0.1}})
    with pytest.raises(ValueError, match="names no trainable param"):
        param_groups(MoE(), "adamc", output="nothing.weight")
    with pytest.raises(TypeError, match="nn.Module"):
        param_groups([torch.zeros(2)], "adamc")
    assert param_groups(MoE(), AdamHD).optimizer == "adamhd"      # the class works as well as its name


def test_summary_shows_role_lmo_decay_shape_and_counts():
    text = str(param_groups(_demo_gpt(), "scionc"))
    lines = text.splitlines()
    assert "output layer: wte.weight (found by model.get_output_embeddings())" in lines[0]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[2:-1]]
    # group, role, lmo, [view], decay, shape, params, names
    by_role = {}
    for r in rows:
        by_role.setdefault(r[1], []).append(r)
    assert {r[1] for r in rows} == {"hidden", "embedding", "output", "norm"}
    assert all(r[2] == "spectral" and r[3] == "corrected (C²)" for r in by_role["hidden"])
    assert sum(int(r[5]) for r in by_role["hidden"]) == 8
    assert by_role["output"] == [["2", "output", "sign", "plain γλ", "(40, 16)", "1", "wte.weight"]]
    assert lines[-1] == "params (elements) per role: hidden 8 (6,144) | embedding 1 (128) | output 1 (640) | norm 5 (80)"
    adamc = str(param_groups(_demo_gpt(), "adamc")).splitlines()
    assert any(re.match(r"2\s+output\s+λ, plain\s+\(40, 16\)\s+1\s+wte.weight", line) for line in adamc)
    assert any(re.match(r"3\s+norm\s+none\s+\(16,\)\s+5", line) for line in adamc)


def test_groups_carry_param_names_into_the_optimizer_state_dict():
    model = UntiedLM()
    opt = AdamHD(param_groups(model, "adamhd"), lr=0.1)
    names = [n for g in opt.state_dict()["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
