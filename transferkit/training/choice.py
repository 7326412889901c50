"""Choosing the kept model among a run's candidates without overfitting a small val split.

The candidates come simplest first (the linear probe, the head, the fine-tuned model). Each
later one replaces the current choice only when, on the same val images, it gets more right
by more than the noise of that count: the square root of the images on which the two disagree
(McNemar's statistic above 1). On 60 val images, two more right with two disagreements wins;
two more right with six disagreements does not, and the simpler model is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

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
