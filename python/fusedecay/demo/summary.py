"""Markdown summaries: the default run's tables and claim table, and the sweep's λ tables and claim table.

Every number is a mean over seeds with its 95 % t interval (``stats``), written "mean ± half-width".
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from .claims import Setting, best_table, iv
from .optimizers import LABELS
from .stats import VERDICTS, interval

CLAIM_HEAD = ["| claim (seed) | measured as | compared | numbers (mean ± 95% interval over seeds) | this run | "
              "paired by seed |", "|---|---|---|---|---|---|"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")   # a literal | would end the table cell


def claim_lines(rows: Sequence[Dict[str, str]]) -> List[str]:
    lines = list(CLAIM_HEAD)
    for r in rows:
        v = f"**{r['verdict']}**" if r["verdict"] in VERDICTS else r["verdict"]
        lines.append(f"| {_cell(r['claim'])} ({r['seed']}) | {_cell(r['measure'])} | {_cell(r['comparison'])} | "
                     f"{_cell(r['numbers'])} | {v} | {r['paired']} |")
    return lines


def run_table(runs: Dict[str, Setting]) -> List[str]:
    lines = ["| optimizer | final val loss | Σ decay η_t (blocks) | ‖θ‖ end ÷ start, final 20% | "
             "‖g‖ end ÷ start, final 20% | Hoyer sparsity | pruned loss, mean 10–80% | median ms/step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in runs.items():
        cells = [iv(s, "final_val_loss").fmt(), iv(s, "decay_sum").fmt(".3f"), iv(s, "weight_norm_ratio").fmt(),
                 iv(s, "grad_norm_ratio").fmt(".3f"), iv(s, "hoyer").fmt(), iv(s, "prune_curve").fmt(),
                 iv(s, "median_step_ms").fmt(".0f")]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


def pruning_table(runs: Dict[str, Setting]) -> List[str]:
    modes = ("layer", "global")
    keys = {m: sorted({k for s in runs.values() for h in s for k in h["pruning"].get(m, {})}, key=float)
            for m in modes}
    shown = {m: [k for k in keys[m] if k in ("0.30", "0.50", "0.70")] or keys[m] for m in modes}
    head = ["dense"] + [f"{m} {float(k):.0%}" for m in modes for k in shown[m]]
    lines = ["| optimizer | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for name, s in runs.items():
        cells = [iv(s, "final_val_loss").fmt()]
        for m in modes:
            for k in shown[m]:
                vals = [h["pruning"].get(m, {}).get(k) for h in s]
                cells.append("—" if None in vals else interval(vals).fmt())
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


VERDICT_NOTE = ("\"this run\": **agrees**/**disagrees** only when the two optimizers' 95% intervals separate, "
                "otherwise **tie**. \"paired by seed\": the same rule on the per-seed difference (candidate − "
                "baseline, \"paired Δ\") against zero — the runs of a seed share init and batches, so this is the "
                "sharper test; it does not change the verdict.")
DECAY_NOTE = ("Σ decay η_t: the total decoupled-decay coefficient the block matrices received (decay alone shrinks "
              "them by about exp(−Σ η_t)); the weight-norm steady state the correction paper reasons about needs "
              "Σ η_t of order 1 or more. \"Final 20%\": the last 20% of the cosine phase of the schedule. "
              "Step times include other load on the machine.")


def default_markdown(meta: Dict[str, str], runs: Dict[str, Setting], rows: Sequence[Dict[str, str]]) -> str:
    lines = [f"# fusedecay demo: {meta['title']}", "", meta["setup"], "",
             f"## Runs (mean ± 95% interval over {meta['n_seeds']} seed(s))", ""]
    lines += run_table(runs)
    lines += ["", DECAY_NOTE, "", "## Validation loss after magnitude pruning of the block matrices", ""]
    lines += pruning_table(runs)
    lines += ["", "## The seeds' claims in this run", "", meta["comparison_note"], "", VERDICT_NOTE, ""]
    lines += claim_lines(rows)
    lines += ["", meta["caveat"], ""]
    return "\n".join(lines)


def sweep_markdown(meta: Dict[str, str], grid: Sequence[Dict[str, Setting]], labels: Sequence[str],
                   scion_settings: Sequence[str], rows: Sequence[Dict[str, str]]) -> str:
    names = list(grid[0])
    best = best_table(grid, labels)
    lines = [f"# fusedecay demo sweep: {meta['title']}", "", meta["setup"], "",
             f"## Val loss and pruned loss against λ (mean ± 95% interval over {meta['n_seeds']} seed(s))", "",
             "λ is the Adam family's weight decay; ScionC and Scion take the decay matched to the same peak decay "
             "γ_max·λ (" + "; ".join(f"λ {lab}: {s}" for lab, s in zip(labels, scion_settings)) + "). "
             "Best λ per optimizer in bold.", ""]
    for key, title in (("final_val_loss", "final val loss"), ("prune_curve", "pruned loss, mean over 10–80% "
                                                                            "per-layer sparsity")):
        lines += [f"**{title}**", "", "| optimizer | " + " | ".join(f"λ {lab}" for lab in labels) + " |",
                  "|---|" + "---|" * len(labels)]
        for n in names:
            cells = []
            for point, lab in zip(grid, labels):
                text = iv(point[n], key).fmt()
                cells.append(f"**{text}**" if best[n][key] == lab else text)
            lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
        lines.append("")
    head = "| optimizer | " + " | ".join(f"λ {lab}" for lab in labels) + " |"
    lines += ["**Σ decay η_t of the block matrices**", "", head, "|---|" + "---|" * len(labels)]
    for n in names:
        lines.append(f"| {LABELS[n]} | " + " | ".join(f"{iv(p[n], 'decay_sum').mean:.3f}" for p in grid) + " |")
    lines += ["", "## The seeds' claims across the sweep", "", meta["comparison_note"], "", VERDICT_NOTE, ""]
    lines += claim_lines(rows)
    lines += ["", meta["caveat"], ""]
    return "\n".join(lines)
