"""An evaluation's report, computed from its scores.jsonl lines alone: report.json, report.md, plots.

Computing it from the lines (not from state kept while scoring) makes a resumed run's report the
same as an uninterrupted one's. Accuracies are fractions; the paper's figure is shown beside the
headline for side-by-side reading.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

from mrrm_jax.benchmarks import metrics

PAPER_MODEL = "Molmo2-4B multi-response RM (paper)"
PLOTS = {"by_category": "accuracy_by_category.png", "margins": "score_margins.png",
         "by_position": "accuracy_by_position.png"}


class Progress:
    """One stderr line: records done of the total, records/s, ETA."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.start_done, self.start = total, done, done, time.time()

    def update(self, count: int) -> None:
        self.done += count
        elapsed = time.time() - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed else 0.0
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate else "?"
        print(f"\r{self.done}/{self.total} records  {rate:.2f} records/s  ETA {eta}   ", end="", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def _passes(line: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(presented order, scores in file order) of each pass a scored line records."""
    if line["order"] == "rotations":
        count = len(line["scores"])
        return [(np.roll(np.arange(count), -shift), np.asarray(scores))
                for shift, scores in enumerate(line["rotation_scores"])]
    return [(np.asarray(line["order"]), np.asarray(line["scores"]))]


def by_position(scored: list[dict]) -> dict[str, dict]:
    """Accuracy by the position (0-based, as the model saw it) of the single best-ranked response;
    records whose best is tied are left out. With rotations every pass counts."""
    correct, positions = [], []
    for line in scored:
        best = np.flatnonzero(metrics.best_mask(line["rankings"]))
        if len(best) != 1:
            continue
        for presented, scores_n in _passes(line):
            positions.append(str(int(np.flatnonzero(presented == best[0])[0])))
            correct.append(metrics.top_correct(scores_n, line["rankings"]))
    return dict(sorted(metrics.by_category(correct, positions).items(), key=lambda kv: int(kv[0])))


def rotations(scored: list[dict]) -> dict | None:
    """Per-rotation accuracy, top-1 agreement across rotations, and the permutation-averaged accuracy."""
    lines = [line for line in scored if line["order"] == "rotations"]
    if not lines:
        return None
    per_rotation = []
    for shift in range(max(len(line["scores"]) for line in lines)):
        oks = [metrics.top_correct(line["rotation_scores"][shift], line["rankings"])
               for line in lines if len(line["scores"]) > shift]
        per_rotation.append({"rotation": shift, "accuracy": metrics.mean(oks), "n": len(oks)})
    agree = [len({int(np.argmax(s)) for s in line["rotation_scores"]}) == 1 for line in lines]
    return {"per_rotation": per_rotation, "top1_agreement": metrics.mean(agree),
            "averaged_accuracy": metrics.mean(line["correct"] for line in lines),
            "passes_per_record": metrics.mean(len(line["scores"]) for line in lines)}


def build(lines: list[dict], spec, benchmark: str, settings: dict, timing: dict) -> dict:
    scored = [line for line in lines if "scores" in line]
    errors = [line for line in lines if "error" in line]
    correct = [line["correct"] for line in scored]
    per_category = metrics.by_category(correct, [line["category"] for line in scored])
    for name, entry in per_category.items():
        entry["ci95"] = metrics.bootstrap_interval([line["correct"] for line in scored if line["category"] == name])
    overall, macro = metrics.mean(correct), metrics.macro(per_category)
    margins = [metrics.margin(line["scores"], line["rankings"]) for line in scored]
    result = {
        "benchmark": benchmark, "checkpoint": settings["checkpoint"], "data": settings["data"],
        "settings": {k: settings[k] for k in ("order", "seed", "mode", "limit")},
        "num_records": len(lines), "num_scored": len(scored), "num_errors": len(errors),
        "headline": {"metric": spec.metric, "aggregate": spec.headline,
                     "value": overall if spec.headline == "overall" else macro},
        "overall": overall, "macro": macro, "by_category": per_category,
        "paper": {"model": PAPER_MODEL, "value": spec.paper},
        "overall_ci95": metrics.bootstrap_interval(correct),
        "margins": {"mean": metrics.mean(margins), "median": float(np.median(margins)) if margins else None},
        "by_position": by_position(scored),
        "errors": [{"index": line["index"], "id": line["id"], "error": line["error"]} for line in errors[:20]],
    }
    if spec.acc_plus:
        result["acc_plus"] = metrics.acc_plus(correct, [line.get("group", line["id"]) for line in scored])
    if spec.rank_metrics:
        pairs = [metrics.ranked_pairs(line["scores"], line["rankings"]) for line in scored]
        taus = [metrics.kendall_tau(line["scores"], line["rankings"]) for line in scored]
        result["pairwise_accuracy"] = (sum(p[0] for p in pairs) / sum(p[1] for p in pairs)) if pairs else None
        result["kendall_tau"] = metrics.mean(t for t in taus if t is not None)
    if (rotation_report := rotations(scored)) is not None:
        result["rotations"] = rotation_report
    result["timing"] = timing
    return result


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def summary(result: dict) -> str:
    headline, paper = result["headline"], result["paper"]["value"]
    return (f"{result['benchmark']}: {headline['metric']} {_percent(headline['value'])}"
            f"{f' (paper {_percent(paper)})' if paper is not None else ''} over {result['num_scored']} records, "
            f"{result['num_errors']} errors")


def markdown(result: dict) -> str:
    headline, settings, timing = result["headline"], result["settings"], result["timing"]
    out = [f"# {result['benchmark']}", "",
           f"Checkpoint `{result['checkpoint']}`, data `{result['data']}`; mode {settings['mode']}, "
           f"order {settings['order']} (seed {settings['seed']}); {result['num_scored']} records scored, "
           f"{result['num_errors']} errors. Accuracies in percent.", "",
           "| metric | ours | paper (Molmo2-4B RM) |", "|---|---|---|",
           f"| **{headline['metric']}** | **{_percent(headline['value'])}** | {_percent(result['paper']['value'])} |",
           f"| overall (micro) accuracy | {_percent(result['overall'])} | |",
           f"| macro accuracy over categories | {_percent(result['macro'])} | |"]
    for key, name in (("acc_plus", "Acc+ (every pair of an id correct)"),
                      ("pairwise_accuracy", "pairwise accuracy over ranked pairs")):
        if key in result:
            out.append(f"| {name} | {_percent(result[key])} | |")
    if "kendall_tau" in result:
        tau = result["kendall_tau"]
        out.append(f"| Kendall tau (mean over records) | {'n/a' if tau is None else f'{tau:.3f}'} | |")
    out += ["", "## By category", "", "| category | accuracy | 95% interval | n |", "|---|---|---|---|"]
    for name, entry in result["by_category"].items():
        low, high = entry["ci95"]
        out.append(f"| {name} | {_percent(entry['accuracy'])} | {_percent(low)}-{_percent(high)} | {entry['n']} |")
    out += ["", f"![accuracy by category]({PLOTS['by_category']})", "",
            "## Position bias", "", "Accuracy by the position at which the model saw the best response:", "",
            "| position | accuracy | n |", "|---|---|---|"]
    out += [f"| {pos} | {_percent(e['accuracy'])} | {e['n']} |" for pos, e in result["by_position"].items()]
    out += ["", f"![accuracy by position]({PLOTS['by_position']})", ""]
    if "rotations" in result:
        rot = result["rotations"]
        out += ["## Rotations", "", "| rotation | accuracy | n |", "|---|---|---|"]
        out += [f"| {r['rotation']} | {_percent(r['accuracy'])} | {r['n']} |" for r in rot["per_rotation"]]
        out += ["", f"Top-1 agreement across rotations: {_percent(rot['top1_agreement'])}. Accuracy of the "
                f"permutation-averaged scores: {_percent(rot['averaged_accuracy'])}, at "
                f"{rot['passes_per_record']:.1f} passes per record instead of 1.", ""]
    margins = result["margins"]
    out += ["## Score margins", "", "Best-ranked response's score minus the strongest other one (> 0 = correct): "
            f"mean {margins['mean'] if margins['mean'] is None else round(margins['mean'], 4)}, median "
            f"{margins['median'] if margins['median'] is None else round(margins['median'], 4)}.", "",
            f"![score margins]({PLOTS['margins']})", "", "## Run", "",
            f"{timing['records_scored_in_this_run']} records scored in this run in {timing['seconds']:.1f} s "
            f"({timing['records_per_s']} records/s) on {timing['devices']} device(s), "
            f"{timing['compiled_programs']} compiled programs.", ""]
    if result["errors"]:
        out += ["## Errors (first 20)", ""] + [f"- `{e['id']}`: {e['error']}" for e in result["errors"]] + [""]
    return "\n".join(out)


def plot(result: dict, lines: list[dict], out_dir: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    scored = [line for line in lines if "scores" in line]
    names = list(result["by_category"])
    accuracy = [result["by_category"][n]["accuracy"] for n in names]
    low = [a - result["by_category"][n]["ci95"][0] for n, a in zip(names, accuracy)]
    high = [result["by_category"][n]["ci95"][1] - a for n, a in zip(names, accuracy)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.2))
    ax.bar(names, accuracy, yerr=[low, high], capsize=4, color="#4c72b0")
    ax.axhline(result["overall"], color="black", lw=1, ls="--", label=f"overall {_percent(result['overall'])}")
    ax.set(ylim=(0, 1), ylabel="accuracy")
    ax.set_title(f"{result['benchmark']}\naccuracy by category, 95% bootstrap interval", fontsize=9)
    ax.legend(loc="lower right")
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS["by_category"], dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist([metrics.margin(line["scores"], line["rankings"]) for line in scored], bins=30, color="#55a868")
    ax.axvline(0, color="black", lw=1)
    ax.set(xlabel="score of the best response - strongest other", ylabel="records", title="score margins")
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS["margins"], dpi=80)
    plt.close(fig)

    positions = result["by_position"]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bars = ax.bar(list(positions), [e["accuracy"] for e in positions.values()], color="#c44e52")
    ax.bar_label(bars, [f"n={e['n']}" for e in positions.values()])
    ax.set(ylim=(0, 1.1), xlabel="position of the best response (as seen)", ylabel="accuracy",
           title="position bias")
    fig.tight_layout()
    fig.savefig(out_dir / PLOTS["by_position"], dpi=80)
    plt.close(fig)


def write(result: dict, lines: list[dict], out_dir: pathlib.Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown(result))
    if result["num_scored"]:
        plot(result, lines, out_dir)
