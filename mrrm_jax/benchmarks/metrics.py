"""Benchmark metrics as pure functions of scores and human rankings (1 = best, ties allowed).

One rule judges a record on every benchmark, as the official scripts do for their cases:

    correct = max(scores of the rank-1 responses) > max(scores of all the others)

At N = 2 that is VL-RewardBench's, MM-RLHF's and VideoRewardBench's `s_chosen > s_rejected`
(a tie is wrong); at N = 4 it is MR2Bench's best-of-4 (the argmax is one of the human's tied-best
responses, strictly above every other response). Aggregates: `overall` (micro: the mean over
records), `macro` (the mean of the per-category accuracies), `acc_plus` (MM-RLHF: the share of
question ids whose every pair is correct).
"""

from __future__ import annotations

import collections
import math

import numpy as np
import scipy.stats


def _checked(scores_n, rankings_n) -> tuple[np.ndarray, np.ndarray]:
    scores_n, rankings_n = np.asarray(scores_n, np.float64), np.asarray(rankings_n)
    if scores_n.shape != rankings_n.shape or scores_n.ndim != 1:
        raise ValueError(f"{scores_n.shape[-1] if scores_n.ndim else 0} scores for {rankings_n.size} rankings")
    if not np.isfinite(scores_n).all():
        raise ValueError(f"non-finite score in {scores_n.tolist()}")
    return scores_n, rankings_n


def best_mask(rankings_n) -> np.ndarray:
    """The human's best responses (rank 1, or the lowest rank given); refuses a record without a preference."""
    rankings_n = np.asarray(rankings_n)
    best = rankings_n == rankings_n.min()
    if best.all():
        raise ValueError(f"rankings {rankings_n.tolist()} prefer no response over another")
    return best


def top_correct(scores_n, rankings_n) -> bool:
    """The best score belongs to a best-ranked response and beats every other response strictly."""
    scores_n, rankings_n = _checked(scores_n, rankings_n)
    best = best_mask(rankings_n)
    return bool(scores_n[best].max() > scores_n[~best].max())


def margin(scores_n, rankings_n) -> float:
    """Best-ranked response's score minus the strongest other one: > 0 exactly when `top_correct`."""
    scores_n, rankings_n = _checked(scores_n, rankings_n)
    best = best_mask(rankings_n)
    return float(scores_n[best].max() - scores_n[~best].max())


def ranked_pairs(scores_n, rankings_n) -> tuple[int, int]:
    """(pairs ordered as the human orders them, pairs the human orders): ties in the ranking are not
    pairs; a tie in the scores is wrong."""
    scores_n, rankings_n = _checked(scores_n, rankings_n)
    better_nn = rankings_n[:, None] < rankings_n[None, :]
    return int((better_nn & (scores_n[:, None] > scores_n[None, :])).sum()), int(better_nn.sum())


def kendall_tau(scores_n, rankings_n) -> float | None:
    """Kendall's tau-b between the scores and the human order (rank 1 = highest); None when either is
    constant (undefined)."""
    scores_n, rankings_n = _checked(scores_n, rankings_n)
    tau = scipy.stats.kendalltau(scores_n, -rankings_n).statistic
    return None if math.isnan(tau) else float(tau)


def mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def by_category(correct: list[bool], categories: list[str]) -> dict[str, dict]:
    """{category: {"accuracy", "n"}}, categories in sorted order."""
    groups = collections.defaultdict(list)
    for ok, category in zip(correct, categories):
        groups[category].append(ok)
    return {name: {"accuracy": mean(groups[name]), "n": len(groups[name])} for name in sorted(groups)}


def macro(per_category: dict[str, dict]) -> float | None:
    return mean(entry["accuracy"] for entry in per_category.values())


def acc_plus(correct: list[bool], group_keys: list[str]) -> float | None:
    """Share of groups (e.g. MM-RLHF question ids) whose every record is correct."""
    groups = collections.defaultdict(list)
    for ok, key in zip(correct, group_keys):
        groups[key].append(ok)
    return mean(all(oks) for oks in groups.values())


def bootstrap_interval(correct: list[bool], seed: int = 0, samples: int = 2000) -> list[float] | None:
    """95% percentile bootstrap interval of the accuracy (records resampled with replacement)."""
    if not correct:
        return None
    correct_r = np.asarray(correct, np.float64)
    draws_sr = np.random.default_rng(seed).integers(0, len(correct_r), (samples, len(correct_r)))
    low, high = np.percentile(correct_r[draws_sr].mean(axis=1), [2.5, 97.5])
    return [float(low), float(high)]
