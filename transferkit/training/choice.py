"""Choosing the kept model among a run's candidates without overfitting a small val split.

The candidates come simplest first (the linear probe, the head, the fine-tuned model). Each
later one replaces the current choice only when, on the same val images, it gets more right
by more than the noise of that count: the square root of the images on which the two disagree
(McNemar's statistic above 1). On 60 val images, two more right with two disagreements wins;
two more right with six disagreements does not, and the simpler model is kept.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from transferkit.runs.records import Choice, Comparison
from transferkit.stats import paired_margin

# The fewest more right answers a later candidate can win by: a margin m > sqrt(d) with d >= m
# disagreements needs m > sqrt(m), so m >= 2. A candidate that cannot reach the kept one's
# count plus this could only be thrown away (training.loop stops or skips it).
LEAST_WIN = 2


def choose(correct: Mapping[str, np.ndarray]) -> Choice:
    """The kept candidate, from each candidate's boolean array of right answers on val
    (in order, simplest first)."""
    names = list(correct)
    kept, comparisons = names[0], []
    for other in names[1:]:
        margin, noise = paired_margin(correct[kept], correct[other])
        won = margin > 0 and margin > noise
        comparisons.append(Comparison(simpler=kept, other=other, margin=margin,
                                      noise=round(noise, 3), won=won))
        if won:
            kept = other
    return Choice(val_correct={name: int(c.sum()) for name, c in correct.items()},
                  n=len(next(iter(correct.values()))), comparisons=tuple(comparisons),
                  kept=kept)


def describe(choice: Choice) -> str:
    """One line for the console and the log: the kept model and the comparison that decided
    it (the console's table at the end of a run shows every candidate)."""
    deciding = next((c for c in reversed(choice.comparisons) if c.won), None) or next(
        (c for c in choice.comparisons if c.margin > 0), None)
    if deciding is None:
        return f"Kept '{choice.kept}': no later candidate got more right on val."
    how = f"{deciding.margin:+d} of {choice.n} val images (noise {deciding.noise:.1f})"
    if deciding.won:
        return f"Kept '{choice.kept}': {how} over '{deciding.simpler}'."
    return (f"Kept '{choice.kept}': '{deciding.other}' got {how}, within noise, so the "
            f"simpler model stays.")


# What each candidate is, and why it was kept when it is the run's model (reports say it)
_KEPT_BECAUSE = {
    "probe": "the linear probe: a logistic regression on the frozen base's features, fitted "
             "first; no later candidate beat it by more than noise on val",
    "combined": "one linear probe on several bases' frozen features side by side; it beat "
                "the single probe by more than noise on val, and nothing after it did",
    "self-trained": "the linear probe fitted again with the unlabelled pool's surest answers; "
                    "it beat the probe by more than noise on val",
    "co-trained": "the linear probe fitted again with the unlabelled pool's images on which "
                  "it and a classifier of their raw pixels agreed; it beat the candidates "
                  "before it by more than noise on val",
    "earlier-block": "a linear probe on an earlier block's features, which the data checks "
                     "found further from ImageNet; it beat the probe by more than noise on val",
    "upsampled": "a linear probe on the features of the image upsampled inside the model, so "
                 "small details reach the base; it beat the probe by more than noise on val",
    "head": "the head trained further on the frozen base; it beat the candidates before it "
            "by more than noise on val",
    "finetune": "the base fine-tuned from the head: its top two blocks by default, every "
                "block where the data checks found the data unlike ImageNet, or as many as "
                "--unfreeze-blocks says; it beat the candidates before it by more than noise "
                "on val"}


def tried(choice: Choice, dropped: Mapping[str, int], stages: Collection[str]
          ) -> list[tuple[str, int, Comparison | None]]:
    """Every candidate a run tried, simplest first, with its val images right and how it
    fared against the one kept before it (None: the first, or `dropped`). The choice read its
    own in that order; `dropped`, those fitted before the stages (named `stages`) that did not
    beat the probe, go before the stages."""
    steps = {c.other: c for c in choice.comparisons}
    chosen = [(name, n, steps.get(name)) for name, n in choice.val_correct.items()]
    first_stage = next((i for i, (name, *_) in enumerate(chosen) if name in stages),
                       len(chosen))
    return [*chosen[:first_stage], *((name, n, None) for name, n in dropped.items()),
            *chosen[first_stage:]]


def why_kept(name: str) -> str:
    """What the kept candidate `name` is and why it was kept, in a line."""
    return _KEPT_BECAUSE.get(name, "it beat the candidates before it by more than noise on "
                                   "val")


# The on-course rule (callbacks.OffCourseStopping): a stage's pace against what it needs
def best_correct(rows: Sequence[dict[str, Any]], val_images: int) -> int:
    """The most val images any of these epochs got right."""
    return max((round(r["val_accuracy"] * val_images) for r in rows if "val_accuracy" in r),
               default=0)


def projected_correct(rows: Sequence[dict[str, Any]], val_images: int, last_epoch: int
                      ) -> float:
    """Where a stage's best would be by its last epoch at the pace it has gained so far
    (its best over its first epoch's, per epoch since): a stage still climbing fast is on
    course even below the bar; one that has flattened out below it is not."""
    right = [round(r["val_accuracy"] * val_images) for r in rows if "val_accuracy" in r]
    if len(right) < 2:
        return float("inf")
    pace = (max(right) - right[0]) / (len(right) - 1)
    return max(right) + pace * max(last_epoch - rows[-1]["epoch"], 0)
