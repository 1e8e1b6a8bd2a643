"""End-to-end and unit tests of ``python -m fusedecay.demo`` on a tiny configuration (CPU, seconds)."""
import json
import math

import pytest
import torch

from fusedecay.demo import main
from fusedecay.demo.claims import best_setting, pruning_row, shared_claims, steps_to, sweep_claims
from fusedecay.demo.cli import _group, build_parser, resolve_args
from fusedecay.demo.corpus import list_sources, load_corpus, split_files
from fusedecay.demo.measures import (curve_summary, final_phase, first_crossing, first_rise_above, grad_norm_ratio,
                                     weight_norm_ratio)
from fusedecay.demo.model import GPT, GPTConfig
from fusedecay.demo.optimizers import (EXTRA_OPTIMIZERS, OPTIMIZERS, Hyper, build_optimizer, hidden_decay,
                                       lr_lambda)
from fusedecay.demo.prune import hidden_matrices, prune_, pruned_losses
from fusedecay.demo.runner import Job
from fusedecay.demo.stats import best_index, interval, paired_verdict, verdict
from fusedecay.demo.train import evaluate

ALL = OPTIMIZERS + EXTRA_OPTIMIZERS
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--steps", "10", "--batch-size", "4", "--seq-len", "32",
        "--eval-every", "5", "--val-batches", "2", "--layer-sparsities", "0.3,0.5,0.7", "--global-sparsities", "0.5",
        "--no-progress", "--workers", "1"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small deterministic stand-in for the stdlib: 24 Python files in two folders."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        sub = root / ("pkg" if i % 2 else "mod")
        sub.mkdir(exist_ok=True)
        body = "".join(f"def f_{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n\n" for j in range(40))
        (sub / f"file_{i:02d}.py").write_text(f'"""Module {i}."""\n' + body)
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third_party.py").write_text("ignored = True\n")
    return root


def _run(out, corpus_dir, *extra):
    assert main(TINY + ["--corpus-dir", str(corpus_dir), "--out", str(out), *extra]) == 0
    name = "sweep.json" if "--sweep" in extra else "metrics.json"
    return json.loads((out / name).read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, corpus_dir):
    out = tmp_path_factory.mktemp("demo") / "all"
    return out, _run(out, corpus_dir, "--seeds", "0,1")


# ---- end to end -------------------------------------------------------------------------------------------------

def test_end_to_end_outputs(full_run):
    out, m = full_run
    for key in ("config", "model", "hyperparameters", "corpus", "env", "runs", "claims", "figures",
                "total_wall_time_s"):
        assert key in m
    assert list(m["runs"]) == list(ALL)          # the uncorrected Scion baseline runs by default
    for name, setting in m["runs"].items():
        assert [h["seed"] for h in setting] == [0, 1]
        for r in setting:
            assert len(r["train_loss"]) == 10 and all(math.isfinite(x) for x in r["train_loss"])
            assert r["val_step"] == [0, 5, 10]
            assert set(r["pruning"]) == {"layer", "global"} and set(r["pruning"]["layer"]) == {"0.30", "0.50", "0.70"}
            assert set(r["weight_norm"]) == set(r["layers"]) == set(r["grad_norm"])
            assert r["measures"]["final_val_loss"] == r["val_loss"][-1]
    verdicts = {c["verdict"] for c in m["claims"]}
    assert verdicts <= {"agrees", "tie", "disagrees", "not tested"}
    assert all(c["comparison"] in ("shared λ 2", "—") for c in m["claims"])
    assert len(m["claims"]) == 10
    assert set(m["figures"]) == {"curves", "final_phase", "norms", "histograms", "pruning"}
    for fname in m["figures"].values():
        data = (out / fname).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC
    summary = (out / "summary.md").read_text()
    assert "| AdamHD |" in summary and "Wall time" in summary and "at commit" in summary
    assert "--seeds 0,1" in summary


def test_claim_numbers_are_the_seed_intervals(full_run):
    """The claim table's val-loss row is the 95 % interval of the per-seed final losses."""
    _, m = full_run
    row = next(c for c in m["claims"] if c["claim"].startswith("lower validation perplexity"))
    for name, label in (("adamw", "AdamW"), ("adamhd", "AdamHD")):
        iv = interval([h["val_loss"][-1] for h in m["runs"][name]])
        assert f"{label} {iv.mean:.4f} ± {iv.half:.4f}" in row["numbers"]


def test_optimizers_actually_train(full_run):
    _, m = full_run
    for name, setting in m["runs"].items():
        for r in setting:
            assert r["val_loss"][-1] < r["val_loss"][0], name


def test_seeds_differ_and_optimizers_share_them(full_run):
    _, m = full_run
    w = m["runs"]["adamw"]
    assert w[0]["train_loss"] != w[1]["train_loss"]
    for name in ALL:   # same seed → same init → same loss before the first step, whatever the optimizer
        assert [h["train_loss"][0] for h in m["runs"][name]] == [h["train_loss"][0] for h in w]


def test_same_seed_gives_identical_losses(tmp_path, corpus_dir, full_run):
    again = _run(tmp_path / "again", corpus_dir, "--seeds", "1", "--optimizers", "adamw,scionc")
    _, first = full_run
    for name in ("adamw", "scionc"):
        assert again["runs"][name][0]["train_loss"] == first["runs"][name][1]["train_loss"]
        assert again["runs"][name][0]["val_loss"] == first["runs"][name][1]["val_loss"]
    row = [c for c in again["claims"] if "uncorrected Scion" in c["claim"]]
    assert len(row) == 1 and row[0]["verdict"] == "not tested"


def test_worker_processes_give_the_in_process_results(tmp_path, corpus_dir):
    """Two worker processes with one thread each reproduce one in-process run with one thread, job by job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = _run(tmp_path / "serial", corpus_dir, "--seeds", "0,1", "--optimizers", "adamw,scion")
    finally:
        torch.set_num_threads(threads)
    args = TINY[:-2] + ["--workers", "2", "--corpus-dir", str(corpus_dir), "--out", str(tmp_path / "pool"),
                        "--seeds", "0,1", "--optimizers", "adamw,scion"]   # scion is submitted first
    assert main(args) == 0
    pooled = json.loads((tmp_path / "pool" / "metrics.json").read_text())
    for name in ("adamw", "scion"):
        for a, b in zip(serial["runs"][name], pooled["runs"][name]):
            assert a["seed"] == b["seed"] and a["train_loss"] == b["train_loss"]


def test_sweep_end_to_end(tmp_path, corpus_dir):
    m = _run(tmp_path / "sweep", corpus_dir, "--sweep", "--sweep-lambdas", "2,0.5", "--seeds", "0,1",
             "--optimizers", "adamw,adamhd,scionc,scion")
    assert m["lambdas"] == [0.5, 2.0]
    assert [hp["weight_decay"] for hp in m["hyperparameters"]] == [0.5, 2.0]
    # the Scion family's decay follows the grid (matched peak decay), so its C² differs between grid points
    c2 = [hp["scion_norm_target"] for hp in m["hyperparameters"]]
    assert c2[0] == pytest.approx(4 * c2[1])
    assert set(m["measures"][0]) == {"adamw", "adamhd", "scionc", "scion"} and len(m["measures"][0]["adamw"]) == 2
    comparisons = " ".join(c["comparison"] for c in m["claims"])
    assert "best-vs-best" in comparisons and "shared λ" in comparisons and "across the grid" in comparisons
    assert any("more robust to λ" in c["claim"] for c in m["claims"])
    data = (tmp_path / "sweep" / "sweep.png").read_bytes()
    assert data[:8] == PNG_MAGIC
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "λ 0.5" in summary and "λ 2" in summary


def test_summary_table_rows_have_six_cells(full_run):
    out, _ = full_run
    text = (out / "summary.md").read_text()
    table = text.split("## The seeds' claims in this run")[1].split("**Scale caveat")[0]
    rows = [r for r in table.splitlines() if r.startswith("|")]
    assert len(rows) == 12
    for r in rows:   # '|' inside a cell must be escaped, or the Markdown table breaks
        assert len(r.replace("\\|", "").strip("|").split("|")) == 6, r


# ---- command line -----------------------------------------------------------------------------------------------

def _args(*argv):
    return resolve_args(build_parser().parse_args(list(argv)))


def test_regimes():
    d = _args()
    assert (d.steps, d.batch_size, d.adam_lr, d.weight_decay, d.seeds) == (600, 8, 3e-3, 2.0, [0, 1, 2])
    assert d.scion_norm_target is None and d.scion_weight_decay is None           # matched to γ_max·λ
    q = _args("--regime", "quick")
    assert (q.steps, q.batch_size, q.adam_lr, q.weight_decay, q.seeds) == (400, 16, 1e-3, 0.1, [0])
    assert (q.scion_norm_target, q.scion_weight_decay) == (1.1875, 1.0)
    assert _args("--seeds", "3,1", "--weight-decay", "0.5").seeds == [3, 1]


def test_default_regime_gives_every_decayed_optimizer_a_total_decay_of_at_least_one():
    """Σ_t η_t of the block matrices over the default schedule ≥ 1 for every optimizer (the issue's requirement)."""
    a = _args()
    hp = Hyper(adam_lr=a.adam_lr, weight_decay=a.weight_decay)
    f = lr_lambda(a.steps, hp.warmup_frac)
    for name in ALL:
        total = sum(hidden_decay(name, hp, f(t)) for t in range(a.steps))
        assert total >= 1.0, (name, total)


@pytest.mark.parametrize("argv, message", [
    (["--sweep", "--scion-norm-target", "1"], "cannot be combined"),
    (["--sweep-lambdas", "0.1,1"], "only used with --sweep"),
    (["--sweep", "--sweep-lambdas", "1"], "at least 2"),
    (["--device", "cuda", "--workers", "2"], "--workers"),
    (["--layer-sparsities", "0.9"], "pruning-curve summary"),
])
def test_bad_flag_combinations_fail_clearly(argv, message):
    with pytest.raises(SystemExit, match=message):
        _args(*argv)


def test_sweep_grid_defaults_to_multiples_of_the_regime_lambda():
    assert _args("--sweep").sweep_lambdas == [0.2, 0.6, 2.0, 6.0]


def test_gpt2_124m_preset_has_gpt2_small_shape():
    """--size gpt2-124m (the --device cuda scale) resolves to GPT-2 small's blocks: 12 × 768, 12 heads, 1024 context,
    one worker. Built on the meta device: the shape is checked without allocating it."""
    a = _args("--size", "gpt2-124m", "--device", "cuda")
    assert (a.n_layer, a.n_head, a.n_embd, a.seq_len, a.workers) == (12, 12, 768, 1024, 1)
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.seq_len))
    total = sum(p.numel() for p in model.parameters())
    # GPT-2 small's 12 blocks hold 12 · (4·768² + 2·4·768²) = 84.9M matrix weights; with a byte vocabulary the
    # embeddings add only 256·768 + 1024·768.
    assert 84_900_000 < total < 86_000_000, total


def test_results_are_grouped_by_optimizer_and_seed_whatever_the_job_order():
    jobs = [Job("adamc", 1, Hyper()), Job("adamw", 1, Hyper()), Job("adamc", 0, Hyper()), Job("adamw", 0, Hyper())]
    results = [{"id": f"{j.name}{j.seed}"} for j in jobs]
    grouped = _group(results, jobs, ["adamw", "adamc"], [0, 1])
    assert list(grouped) == ["adamw", "adamc"]
    assert [r["id"] for r in grouped["adamw"]] == ["adamw0", "adamw1"]
    assert [r["id"] for r in grouped["adamc"]] == ["adamc0", "adamc1"]


# ---- seed statistics and verdicts --------------------------------------------------------------------------------

def test_interval_is_the_student_t_95_interval():
    iv = interval([1.0, 2.0, 3.0])      # mean 2, sample sd 1, t(0.975, 2) = 4.303
    assert iv.mean == pytest.approx(2.0) and iv.n == 3
    assert iv.half == pytest.approx(4.303 / math.sqrt(3))
    iv = interval([5.0, 7.0])           # sd √2, t(0.975, 1) = 12.706
    assert iv.lo == pytest.approx(6.0 - 12.706 * math.sqrt(2) / math.sqrt(2))
    one = interval([4.0])
    assert (one.mean, one.lo, one.hi, one.n) == (4.0, 4.0, 4.0, 1)
    assert interval([2.5] * 4).half == 0.0
    with pytest.raises(ValueError):
        interval([])


@pytest.mark.parametrize("cand, base, better, expected", [
    ([1.00, 1.01, 1.02], [1.10, 1.11, 1.12], "lower", "agrees"),      # separated, candidate lower
    ([1.10, 1.11, 1.12], [1.00, 1.01, 1.02], "lower", "disagrees"),   # separated, candidate higher
    ([1.00, 1.05, 1.10], [1.04, 1.06, 1.08], "lower", "tie"),         # overlapping intervals
    ([0.30, 0.31, 0.32], [0.20, 0.21, 0.22], "higher", "agrees"),
    ([0.20, 0.21, 0.22], [0.30, 0.31, 0.32], "higher", "disagrees"),
    ([1.0], [2.0], "lower", "tie"),                                    # one seed: no interval, no verdict
    ([1.00, 1.01], [1.05, 1.06], "lower", "tie"),                      # means apart but t(1) intervals overlap
])
def test_verdict_needs_separated_intervals(cand, base, better, expected):
    assert verdict(interval(cand), interval(base), better) == expected


def test_paired_verdict_sees_a_consistent_difference_that_the_seed_spread_hides():
    """Seed 2 is worse for both optimizers; the candidate is 0.06 lower on every seed: the two intervals overlap
    (tie), the per-seed differences do not straddle zero (paired: agrees)."""
    base, cand = [2.25, 2.28, 2.34], [2.19, 2.21, 2.28]
    assert verdict(interval(cand), interval(base), "lower") == "tie"
    assert paired_verdict(base, cand, "lower") == "agrees"
    assert paired_verdict(cand, base, "lower") == "disagrees"
    assert paired_verdict(base, [2.19, 2.30, 2.28], "lower") == "tie"     # one seed the other way
    assert paired_verdict([1.0], [0.5], "lower") == "tie"


def test_verdict_rejects_an_unknown_direction():
    with pytest.raises(ValueError, match="better"):
        verdict(interval([1.0, 2.0]), interval([1.0, 2.0]), "smaller")


def test_best_index_picks_the_best_mean():
    assert best_index([[3.0, 3.2], [2.0, 2.2], [2.1, 2.2]]) == 1
    assert best_index([[0.1, 0.3], [0.5, 0.4]], better="higher") == 1
    assert best_index([[1.0], [1.0]]) == 0                              # first on exact ties
    assert best_index([[float("nan"), 1.0], [5.0, 5.0]]) == 1          # a diverged seed is never "best"


# ---- measures ---------------------------------------------------------------------------------------------------

def _history(block_norms, grads, val_step=(0, 5, 10), val_loss=(3.0, 2.5, 2.0)):
    return {"train_loss": [0.0] * len(block_norms), "layers": ["blocks.0.mlp.fc.weight", "wte.weight"],
            "weight_norm": {"blocks.0.mlp.fc.weight": list(block_norms), "wte.weight": [100.0] * len(block_norms)},
            "grad_norm_total": list(grads), "val_step": list(val_step), "val_loss": list(val_loss)}


def test_final_phase_is_the_last_fifth_of_the_cosine_phase():
    assert final_phase(100, 0.1) == (82, 99)     # warmup 10 steps, cosine 90 steps, its last 18 steps
    assert final_phase(100, 0.0) == (80, 99)


def test_weight_and_grad_norm_ratios_read_the_final_phase():
    n = 100
    first, last = final_phase(n, 0.1)
    norms = [2.0] * n
    for t in range(first, n):                    # decays linearly from 2.0 to 1.5 inside the window only
        norms[t] = 2.0 - 0.5 * (t - first) / (last - first)
    grads = [1.0] * (n - 4) + [3.0] * 4          # the last 4 of the window's 18 steps (its last fifth) are 3×
    h = _history(norms, grads)
    assert weight_norm_ratio(h, 0.1) == pytest.approx(0.75)           # the embedding (not a block) is ignored
    assert grad_norm_ratio(grads, 0.1) == pytest.approx(3.0)
    assert grad_norm_ratio([1.0] * n, 0.1) == pytest.approx(1.0)
    early = [5.0] * 50 + [1.0] * 50              # changes before the window do not count
    assert grad_norm_ratio(early, 0.1) == pytest.approx(1.0)


def test_convergence_and_pruning_curve_measures():
    assert first_crossing([0, 10, 20], [3.0, 2.0, 1.0], 1.5) == pytest.approx(15.0)
    assert first_crossing([0, 10], [3.0, 2.0], 1.0) is None
    assert first_rise_above([0.0, 0.5, 0.9], [2.0, 2.0, 3.0], 2.5) == pytest.approx(0.7)
    assert first_rise_above([0.0, 0.5], [2.0, 2.1], 2.5) == 0.5         # never crosses: the grid's end
    pruning = {"0.10": 2.0, "0.50": 3.0, "0.80": 4.0, "0.90": 100.0}
    assert curve_summary(pruning) == pytest.approx(3.0)                # 90 % is outside the summary's range
    with pytest.raises(ValueError, match="no sparsity"):
        curve_summary({"0.90": 1.0})


def test_steps_to_a_target_per_seed():
    seeds = [{"val_step": [0, 10, 20], "val_loss": [3.0, 2.0, 1.0]},
             {"val_step": [0, 10, 20], "val_loss": [3.0, 2.5, 1.5]}]
    assert steps_to(seeds, 2.0) == [10.0, pytest.approx(15.0)]


# ---- claims from synthetic runs ------------------------------------------------------------------------------------

def _fake(final, prune_curve, prune_layer, hoyer=0.2, w_ratio=1.0, g_ratio=1.0):
    """A run reduced to what the claims read."""
    layer = {"0.10": final + 0.01, "0.50": prune_layer, "0.70": prune_layer + 0.2, "0.90": prune_layer + 1.0}
    return {"final_val_loss": final, "val_step": [0, 50, 100], "val_loss": [5.0, final + 0.3, final],
            "pruning": {"layer": layer},
            "measures": {"final_val_loss": final, "prune_curve": prune_curve, "prune_layer_0.50": prune_layer,
                         "prune_layer_0.70": prune_layer + 0.2, "hoyer": hoyer, "near_zero_frac": 0.1,
                         "weight_norm_ratio": w_ratio, "grad_norm_ratio": g_ratio}}


def test_pruning_claim_judges_the_curve_summary():
    W = [_fake(2.00, 2.50, 2.40), _fake(2.01, 2.52, 2.42), _fake(2.02, 2.51, 2.41)]
    H = [_fake(2.00, 2.20, 2.10), _fake(2.01, 2.22, 2.12), _fake(2.02, 2.21, 2.11)]
    row = pruning_row("adamw", "adamhd", W, H, "shared λ 1")
    assert row["verdict"] == "agrees" and "at 50%" in row["numbers"] and "memory saving" in row["numbers"]
    assert pruning_row("adamw", "adamhd", H, W, "shared λ 1")["verdict"] == "disagrees"
    assert pruning_row("adamw", "adamhd", W, W, "shared λ 1")["verdict"] == "tie"


def test_norm_claims_compare_corrected_against_uncorrected():
    base = [_fake(2.0, 2.5, 2.4, w_ratio=r, g_ratio=g) for r, g in ((0.95, 1.30), (0.96, 1.32), (0.95, 1.31))]
    corr = [_fake(2.0, 2.5, 2.4, w_ratio=r, g_ratio=g) for r, g in ((1.00, 1.01), (1.01, 1.00), (1.00, 1.02))]
    rows = {r["claim"]: r for r in shared_claims({"adamw": base, "adamc": corr}, "shared λ 1")}
    assert rows["AdamC: the weight norm does not decay at the end of the cosine schedule, where AdamW's does"][
        "verdict"] == "agrees"
    assert rows["AdamC: the gradient norm does not rise at the end of the cosine schedule, where AdamW's does"][
        "verdict"] == "agrees"
    swapped = {r["claim"]: r["verdict"] for r in shared_claims({"adamw": corr, "adamc": base}, "shared λ 1")}
    assert set(v for k, v in swapped.items() if k.startswith("AdamC")) == {"disagrees"}


def test_state8_row_is_an_equivalence_test_within_one_percent():
    """8-bit vs fp32 AdamHD: "agrees" when the per-seed relative difference of the val loss lies within ±1%,
    "disagrees" when it lies entirely outside, "tie" when its interval straddles the bound."""
    fp32 = [_fake(f, 2.5, 2.4) for f in (2.00, 2.10, 2.20)]

    def row(rel):
        q = [_fake(h["final_val_loss"] * (1 + r), 2.5, 2.4) for h, r in zip(fp32, rel)]
        rows = [r for r in shared_claims({"adamhd": fp32, "adamhd8": q}, "shared λ 1") if "8-bit" in r["claim"]]
        assert len(rows) == 1
        return rows[0]
    assert row([0.001, 0.002, 0.003])["verdict"] == "agrees"          # +0.2 % ± small
    assert row([0.040, 0.042, 0.041])["verdict"] == "disagrees"       # +4 %, consistently
    assert row([-0.030, 0.000, 0.030])["verdict"] == "tie"            # straddles ±1 %
    assert "relative" in row([0.001, 0.002, 0.003])["numbers"]
    assert not [r for r in shared_claims({"adamhd": fp32}, "shared λ 1") if "8-bit" in r["claim"]]


def test_adamhd8_runs_adamhd_with_8bit_state():
    model = _tiny_model()
    opt = build_optimizer("adamhd8", model, Hyper())
    assert type(opt).__name__ == "AdamHD" and all(g["state_bits"] == 8 for g in opt.param_groups)
    assert all(g["state_bits"] == 32 for g in build_optimizer("adamhd", model, Hyper()).param_groups)
    assert "adamhd8" not in resolve_args(build_parser().parse_args([])).optimizers   # optional, not default
    assert resolve_args(build_parser().parse_args(["--optimizers", "adamhd,adamhd8"])).optimizers == [
        "adamhd", "adamhd8"]


def test_sweep_picks_each_optimizers_own_best_lambda():
    """AdamW is best at the smallest λ, AdamHD at the largest; best-vs-best compares 2.0 with 1.9 (agrees), while
    at the shared smallest λ AdamHD would be worse."""
    def pt(w, h):
        return {"adamw": [_fake(w + d, 3.0, 2.9) for d in (0, 0.01, 0.02)],
                "adamhd": [_fake(h + d, 3.0, 2.9) for d in (0, 0.01, 0.02)]}
    grid = [pt(2.0, 2.3), pt(2.2, 2.1), pt(2.5, 1.9)]
    labels = ["0.1", "0.3", "1"]
    assert best_setting(grid, "adamw", "final_val_loss") == 0
    assert best_setting(grid, "adamhd", "final_val_loss") == 2
    rows = sweep_claims(grid, labels)
    loss = next(r for r in rows if r["claim"].startswith("lower validation perplexity"))
    assert loss["verdict"] == "agrees"
    assert "AdamW at λ 0.1 (grid edge)" in loss["comparison"] and "AdamHD at λ 1 (grid edge)" in loss["comparison"]
    robust = next(r for r in rows if r["claim"].startswith("AdamHD is more robust to λ") and "val loss" in r["claim"])
    assert robust["verdict"] == "agrees"         # spread over the grid 0.5 (AdamW) vs 0.4 (AdamHD) on every seed
    assert robust["numbers"].startswith("AdamW 0.5000 ± 0.0000, AdamHD 0.4000 ± 0.0000")


# ---- optimizers, schedule, corpus, pruning -------------------------------------------------------------------------

def _tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))


def test_optimizer_groups_follow_the_papers_layer_rules():
    model = _tiny_model()
    hp = Hyper()
    adamc = build_optimizer("adamc", model, hp)
    out = [g for g in adamc.param_groups if any(p is model.wte.weight for p in g["params"])]
    assert len(out) == 1 and out[0]["corrected"] is False and out[0]["weight_decay"] == hp.weight_decay
    hidden = [g for g in adamc.param_groups if any(p is model.blocks[0].attn.qkv.weight for p in g["params"])]
    assert hidden[0]["corrected"] is True
    scionc = build_optimizer("scionc", model, hp)
    kinds = {g["lmo"]: g for g in scionc.param_groups}
    assert kinds["spectral"]["corrected"] and kinds["spectral"]["norm_target"] == hp.scion_norm_target
    assert not kinds["sign"]["corrected"] and kinds["sign"]["radius"] > kinds["spectral"]["radius"]
    assert any(p is model.wte.weight for p in kinds["sign"]["params"])
    assert all(p.ndim == 1 for p in kinds["bias"]["params"]) and kinds["bias"]["weight_decay"] == 0
    assert scionc.defaults["momentum"] == 0.1
    scion = build_optimizer("scion", model, hp)
    spectral = next(g for g in scion.param_groups if g["lmo"] == "spectral")
    assert not spectral["corrected"] and spectral["weight_decay"] == hp.scion_plain_decay
    hd = build_optimizer("adamhd", model, hp)
    assert hd.defaults["delta_mode"] == "ema" and hd.defaults["update"] == "prox"
    assert all(g["weight_decay"] == (hp.weight_decay if g["params"][0].ndim == 2 else 0.0) for g in hd.param_groups)
    assert {p.ndim for g in hd.param_groups for p in g["params"]} == {1, 2}
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("sgd", model, hp)


def test_scion_family_decay_is_matched_to_the_adam_peak_decay():
    """η at the peak lr — ScionC s²(2−α)/(2αC²) with s = γρ, Scion γλ — equals the Adam family's γ_max·λ."""
    hp = Hyper(adam_lr=3e-3, weight_decay=2.0)
    s = hp.scion_lr * hp.scion_hidden_radius
    a = hp.scion_momentum
    assert s * s * (2 - a) / (2 * a * hp.scion_norm_target) == pytest.approx(6e-3)
    assert hp.scion_lr * hp.scion_plain_decay == pytest.approx(6e-3)
    for name in ("adamw", "adamhd", "adamc", "scionc", "scion"):
        assert hidden_decay(name, hp, 1.0) == pytest.approx(6e-3), name
    assert hidden_decay("adamc", hp, 0.5) == pytest.approx(6e-3 * 0.25)   # corrected: ∝ γ_t²
    assert hidden_decay("scion", hp, 0.5) == pytest.approx(6e-3 * 0.5)    # uncorrected: ∝ γ_t
    given = Hyper(scion_norm_target=1.1875, scion_plain_decay=1.0)
    assert (given.scion_norm_target, given.scion_plain_decay) == (1.1875, 1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        Hyper(weight_decay=0.0)


def test_empty_corpus_dir_fails_clearly(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        main(TINY + ["--corpus-dir", str(empty), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_sources(tmp_path / "missing")
    assert not (tmp_path / "o").exists()


def test_split_is_deterministic_and_disjoint(corpus_dir):
    files = list_sources(corpus_dir)
    train, val = split_files(files)
    assert split_files(list_sources(corpus_dir)) == (train, val)
    assert not set(train) & set(val) and len(train) + len(val) == len(files)
    c = load_corpus(corpus_dir)
    assert c.train.dtype == torch.uint8 and c.val.numel() > 0


def test_pruning_zero_sparsity_leaves_val_loss_unchanged():
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (3, 16), generator=g), torch.randint(0, 256, (3, 16), generator=g))]
    ev = lambda m: evaluate(m, batches)  # noqa: E731
    dense = ev(model)
    before = [p.clone() for p in model.parameters()]
    res = pruned_losses(model, ev, [0.0, 0.7])
    assert res["layer"]["0.00"] == dense and res["global"]["0.00"] == dense
    assert res["layer"]["0.70"] != dense          # pruning 70% does change the model's output
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # restored afterwards


@pytest.mark.parametrize("mode", ["layer", "global"])
def test_pruning_removes_the_requested_share_of_smallest_weights(mode):
    model = _tiny_model()
    mats = hidden_matrices(model)
    smallest = torch.cat([m.detach().abs().flatten() for m in mats]).min()
    with torch.no_grad():
        prune_(mats, 0.5, mode)
    zeros = [int((m == 0).sum()) for m in mats]
    if mode == "layer":
        assert zeros == [round(0.5 * m.numel()) for m in mats]
    else:
        assert sum(zeros) == round(0.5 * sum(m.numel() for m in mats))
    kept = torch.cat([m.detach().abs().flatten() for m in mats])
    assert kept[kept > 0].min() >= smallest


def test_schedule_is_warmup_then_cosine_to_zero():
    f = lr_lambda(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5)
    vals = [f(t) for t in range(10, 100)]
    assert all(a >= b for a, b in zip(vals, vals[1:])) and 0 < vals[-1] < 1e-3
