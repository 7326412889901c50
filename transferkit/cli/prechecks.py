"""The checks a command runs before TensorFlow loads (the data folder, the base's bounds,
run directories, TF_CONFIG, --resume), and reading a path list from stdin: so a mistake is
reported at once. Only cli.py uses this module; nothing here imports TensorFlow."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from transferkit.cli.options import Settings
from transferkit.config import AUTO_BASE, STDOUT, DataConfig, FinetuneConfig
from transferkit.errors import ConfigError


def check_data(data: DataConfig, base: str, blocks: int | None = None,
               blocks_option: str = "--unfreeze-blocks") -> None:
    """The checks on a data folder, image size and block count that need no TensorFlow, so
    mistakes are reported at once. `base` auto is checked against each base when ranked."""
    from transferkit.bases import get_base, resolve_image_size
    from transferkit.data.folders import check_data_folder

    if base != AUTO_BASE:
        spec = get_base(base)
        resolve_image_size(spec, data.image_size)
        spec.check_block_count(blocks, blocks_option)
    check_data_folder(data.data_dir)


def check_recipe(config: FinetuneConfig, command: str = "finetune") -> None:
    """finetune's and cv's cheap checks: the data, the base's bounds, the run directory."""
    from transferkit.runs.directory import check_run_output

    check_data(config.data, config.base, config.unfreeze_blocks if config.tunes else None)
    if config.unlabeled is not None and not config.unlabeled.is_dir():
        raise ConfigError(f"--unlabeled '{config.unlabeled}' is not a folder of images.")
    if config.output is not None:
        check_run_output(config.output, config.overwrite, config.data.data_dir, command)
    if config.compute.strategy == "multiworker":
        from transferkit.workers import read_cluster

        read_cluster()  # TF_CONFIG, checked before TensorFlow reads it


def check_resume(run_dir: Path, settings: Settings, command: str) -> None:
    """`command --resume RUN`: the run directory is read (and refused) before TensorFlow."""
    from transferkit.runs.directory import check_resumable, read_record

    if settings.given:
        raise ConfigError(f"--resume continues with the settings the run was started with; "
                          f"got {', '.join(settings.given_options())} too. Drop them, or "
                          f"start a new run with -o.")
    check_resumable(run_dir, read_record(run_dir, finished=False), command)


def with_stdin(paths: list[Path]) -> dict[str, Any]:
    """`paths` with `-` replaced by the non-empty lines of stdin (only the line end is
    removed: a file name may begin or end with a space), and which of them were listed."""
    listed = [Path(line.rstrip("\r\n")) for line in (sys.stdin if STDOUT in paths else ())
              if line.strip()]
    return {"paths": tuple(p for path in paths for p in (listed if path == STDOUT else [path])),
            "listed": frozenset(listed)}
