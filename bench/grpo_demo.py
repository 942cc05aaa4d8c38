"""The GRPO demo's three runs side by side: the paper's RL finding in miniature, on CPU.

    python -m mrrm_jax.train --config=configs/demo.py --workdir=/tmp/mrrm_jax_run                # multi RM
    python -m mrrm_jax.train --config=configs/demo_single.py --workdir=/tmp/mrrm_jax_run_single  # single RM
    python -m bench.grpo_demo [--workdir=/tmp/mrrm_jax_grpo_bench] [--plot=docs/grpo_demo.png]

One SFT warm-up (the first run's; the others load its `policy_base`), then `configs/grpo_demo.py` three
times from the same policy and seed:
  multi   the multi-response RM, each prompt's G samples in one pass (`reward.mode=multi`)
  single  the single-response RM (trained on the same data, each response alone), one pass per sample
  blank   the multi-response RM, the policy's images and videos blacked out (`data.blank_media`): the
          reward still sees the real media, the policy cannot
Prints one markdown row per run (held-out accuracy of the samples and of the greedy answer, before and
after; the validation reward, each run by its own RM, so multi and single are not on one scale) and
plots the held-out curves. Accuracy is the independent measure: the answer the corpus marks best.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import threading
import time

from configs import grpo_demo
from mrrm_jax.policy import loop


def run(name: str, workdir: pathlib.Path, overrides: dict) -> dict:
    cfg = grpo_demo.get_config()
    cfg.update_from_flattened_dict(overrides)
    started = time.perf_counter()
    loop.Run(cfg, workdir / name).run(threading.Event())
    evals = [m for m in map(json.loads, (workdir / name / "metrics.jsonl").read_text().splitlines())
             if m["kind"] == "eval"]
    return {"name": name, "evals": evals, "seconds": time.perf_counter() - started}


def table(results: list[dict]) -> str:
    lines = ["| run | held-out sample accuracy | greedy accuracy | validation reward (own RM) | wall, s (multi: with the SFT) |",
             "|---|---|---|---|---|"]
    for r in results:
        first, last = r["evals"][0], r["evals"][-1]
        cell = lambda k: f"{first[k]:.3f} -> {last[k]:.3f}"
        lines.append(f"| {r['name']} | {cell('accuracy')} | {cell('greedy_accuracy')} | {cell('reward')} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, ax, title in zip(("reward", "accuracy", "greedy_accuracy"), axes,
                              ("validation reward (each run's own RM)", "held-out sample accuracy",
                               "held-out greedy accuracy")):
        for r in results:
            ax.plot([m["step"] for m in r["evals"]], [m[key] for m in r["evals"]], marker="o", label=r["name"])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/mrrm_jax_grpo_bench")
    parser.add_argument("--multi_rm", default="/tmp/mrrm_jax_run/reward_model")
    parser.add_argument("--single_rm", default="/tmp/mrrm_jax_run_single/reward_model")
    parser.add_argument("--plot", default="docs/grpo_demo.png")
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps per run (evaluated every 10)")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir).absolute()
    schedule = {"grpo.num_steps": args.steps, "eval.every_steps": 10}
    warmed = {**schedule, "policy.checkpoint": str(workdir / "multi" / "policy_base"),
              "policy.processor_dir": str(workdir / "multi" / "processor")}
    results = [run("multi", workdir, {**schedule, "reward.checkpoint": args.multi_rm}),
               run("single", workdir, {**warmed, "reward.checkpoint": args.single_rm, "reward.mode": "single"}),
               run("blank", workdir, {**warmed, "reward.checkpoint": args.multi_rm, "data.blank_media": True})]
    print(table(results), flush=True)
    plot(results, pathlib.Path(args.plot))
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
