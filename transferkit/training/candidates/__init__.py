"""The candidates a finetune fits after its linear probe and before its stages, as a table.

Each row is a `Candidate`: it knows when it applies to a run, how it is fitted on train and
scored on val, and how its model is saved. The recipe (training/recipe.py) tries every row
the same way: fits it, compares it with the probe by the paired rule, says so in one line,
saves its model when it won, and records it as a `CandidateRecord` in run.json. The choice
among all candidates (training/choice.py) then reads them simplest first, in the table's
order.

Adding a candidate is one module beside these (a class with `kind`, `phase`, `after_checks`,
`own_features` and `fit`, as protocol.py says) and one row in `CANDIDATES`.
"""

from __future__ import annotations

from collections.abc import Iterable

from transferkit.runs.records import CandidateRecord
from transferkit.training.candidates.co_trained import CoTrainedCandidate
from transferkit.training.candidates.combined import CombinedCandidate
from transferkit.training.candidates.protocol import Candidate, Fitted
from transferkit.training.candidates.self_trained import SelfTrainedCandidate
from transferkit.training.candidates.variants import VariantCandidate

__all__ = ["CANDIDATES", "Candidate", "Fitted", "fitted_before_the_stages", "labelled_the_pool",
           "row", "simplest_first"]


# Simplest first: the order in which the choice reads them, after the probe and before the
# stages. The run fits those that need no data checks first, in this order, then the rest.
CANDIDATES: tuple[Candidate, ...] = (VariantCandidate(), CombinedCandidate(),
                                     SelfTrainedCandidate(), CoTrainedCandidate())


def row(kind: str) -> Candidate:
    """The table's row of that kind."""
    return next(c for c in CANDIDATES if c.kind == kind)


def simplest_first(records: Iterable[CandidateRecord]) -> list[CandidateRecord]:
    """`records` in the table's order (the order the choice reads them)."""
    rank = {row.kind: i for i, row in enumerate(CANDIDATES)}
    return sorted(records, key=lambda r: rank.get(r.kind, len(rank)))


def fitted_before_the_stages(records: Iterable[CandidateRecord], won: bool) -> dict[str, int]:
    """The candidates that beat the probe on val (`won`), or that did not, simplest first,
    with their val images right."""
    return {r.name: r.val_correct for r in simplest_first(records) if r.won == won}


def labelled_the_pool(records: Iterable[CandidateRecord]) -> CandidateRecord | None:
    """The --unlabeled candidate whose pool labels the image stages train on (RUN's
    pseudo_labels.csv): the last one that handed them over, as they are written in order."""
    return next((r for r in reversed(list(records)) if r.details.get("stages_train_on")), None)
