"""The candidates fitted between the probe and the stages, as a table (training/candidates):
one protocol, one way of trying a row, one record type; run format 3 still read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import Recorder, write_class_folder
from typer.testing import CliRunner

from transferkit.cli.app import app
from transferkit.config import DataConfig, FinetuneConfig
from transferkit.training import candidates
from transferkit.training.candidates import Fitted


class AllRight:
    """A toy candidate, written as a new one would be: one class (in a module of its own
    beside the others) and one row in CANDIDATES. It 'fits' a probe that gets every val image
    right and saves the run's model as its own."""

    kind = "all-right"
    phase = "the all-right candidate"
    after_checks = False
    own_features = True

    def fit(self, t, probe):
        from transferkit.runs.checkpoints import save_best

        right = np.ones(len(t.splits.val), bool)
        return Fitted("all-right", right, "All-right probe, a toy", 0.01,
                      lambda run: save_best(run.run_dir, run.model, "all-right"),
                      {"toy": True})


def test_a_new_candidate_is_one_class_and_one_row(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(candidates, "CANDIDATES", (*candidates.CANDIDATES, AllRight()))
    from transferkit.commands import finetune as recipe

    monkeypatch.setattr(recipe, "CANDIDATES", candidates.CANDIDATES)
    probe = recipe._probe

    def losing(t):  # as if the probe got every val image wrong: the toy beats it
        found, right = probe(t)
        return found, np.zeros_like(right)

    monkeypatch.setattr(recipe, "_probe", losing)
    data = write_class_folder(tmp_path / "data", per_class=10)
    reporter = Recorder()
    result = recipe.finetune(FinetuneConfig(
        adapt=False, data=DataConfig(data_dir=data, image_size=32, batch_size=8),
        output=tmp_path / "run", base="tiny", weights="none", finetune_epochs=0,
        patience=0), reporter)  # patience 0: no candidate is skipped for want of room
    assert any(m.startswith("All-right probe, a toy (0.0 s): 6 of 6 val images right")
               for m in reporter.messages)
    from transferkit.runs.directory import read_record

    record = read_record(tmp_path / "run")
    toy = record.candidate("all-right")
    assert toy is not None and toy.won and toy.kind == "all-right" and toy.details == {
        "toy": True}
    assert "all-right" in record.choice.val_correct  # the choice reads it like the others
    assert (tmp_path / "run" / "checkpoints" / "best-all-right.keras").is_file()
    assert result is not None and result.kept_stage in record.choice.val_correct


def _format_3(run_dir: Path) -> None:
    """Rewrites run_dir's run.json as run format 3 wrote its candidates."""
    values = json.loads((run_dir / "run.json").read_text())
    values.pop("candidates")
    values |= {"format_version": 3,
               "variant": {"name": "upsampled", "blocks": 3, "base_size": 64, "c": 1.0,
                           "val_correct": 5, "won": False, "seconds": 0.5},
               "combined": {"bases": ["tiny", "tiny2"], "c": 0.1, "val_correct": 4,
                            "won": False, "seconds": 1.5},
               "self_trained": None}
    (run_dir / "run.json").write_text(json.dumps(values))


def test_a_format_3_run_is_read_and_upgrade_brings_it_forward(trained_run: Path,
                                                             tmp_path: Path):
    import shutil

    from transferkit.runs.directory import read_record

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _format_3(run)
    record = read_record(run)
    assert [(c.name, c.kind, c.val_correct, c.won) for c in record.candidates] == [
        ("upsampled", "variant", 5, False), ("combined", "combined", 4, False)]
    assert record.candidate("upsampled").details["base_size"] == 64
    assert "Combined probe on tiny, tiny2 side by side" in record.candidate("combined").summary
    predicted = CliRunner().invoke(app, ["predict", str(run), str(tmp_path), "-o",
                                         str(tmp_path / "p.csv")])
    assert "run format" not in predicted.output  # format 3 works as it is
    upgraded = CliRunner().invoke(app, ["upgrade", str(run)])
    assert upgraded.exit_code == 0 and "from run format 3 to 4" in " ".join(
        upgraded.stdout.split())
    values = json.loads((run / "run.json").read_text())
    assert values["format_version"] == 4 and "variant" not in values
    assert [c["name"] for c in values["candidates"]] == ["upsampled", "combined"]


def test_the_table_reads_simplest_first():
    from transferkit.runs.records import CandidateRecord

    made = [CandidateRecord(name=n, kind=k, summary="", val_correct=v, won=w, seconds=0)
            for n, k, v, w in (("self-trained", "self-trained", 9, True),
                               ("combined", "combined", 8, False),
                               ("earlier-block", "variant", 7, True))]
    assert [r.name for r in candidates.simplest_first(made)] == [
        "earlier-block", "combined", "self-trained"]
    assert candidates.fitted_before_the_stages(made, won=True) == {"earlier-block": 7,
                                                                  "self-trained": 9}
    assert [row.kind for row in candidates.CANDIDATES] == ["variant", "combined",
                                                           "self-trained", "co-trained"]
