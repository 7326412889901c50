"""`finetune --unlabeled`: co-training with the pixels (training/candidates/co_trained.py)
against the probe without the pool and against self-training, on frozen features.

The protocol is bench/unlabeled.py's: per seed, `per` labelled images a class from train +
val (a fifth of them val), every other train + val image the pool, test scores (mean ± sd
over seeds). Reported: the probe on the labels; the self-trained probe; the pixels' and the
probe's out-of-fold accuracy on the labels, as the data checks measure it (their ratio is
what lets the pixels in); the co-trained probe; the pool row a run would fit (co-trained
where the pixels are let in, self-trained elsewhere); and, tried but not shipped, the same
co-training with another base's features as the second view.

    python -m bench.unlabeled_cotrain --sets digits tuxpaint10 digits_full openclipart10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import transferkit  # noqa: F401  (sets the Keras backend)
from bench.unlabeled import pick_labels


def views(data: Path, second: list[str]) -> tuple:
    """Each view of train + val and of test: Lite0's features, and each of `second`
    ("pixels": the 32 px pixels; otherwise a base's features)."""
    from transferkit.config import DataConfig
    from transferkit.data.folders import load_splits
    from transferkit.features import base_features
    from transferkit.reporting import NullReporter
    from transferkit.training.adaptation import pixels

    config = DataConfig(data_dir=data)
    splits = load_splits(data, config.val_split, config.seed)
    labelled, test = splits.train.join(splits.val), splits.test
    out = {}
    for name in ["efficientnet_lite0", *second]:
        if name == "pixels":
            out[name] = tuple(pixels(s.sources).reshape(len(s), -1) for s in (labelled, test))
        else:
            out[name] = tuple(base_features(name, "imagenet", config, s, NullReporter())
                              for s in (labelled, test))
    return out, labelled, test.labels, len(splits.class_names)


def probe_view(k: int, seed: int):
    """Another base's features read by a probe, as co-training's second view (tried, not
    shipped)."""
    from transferkit.training.probe import fit_probe

    return lambda x_fit, y_fit, x: fit_probe(x_fit, y_fit, k, seed=seed).probabilities(x)


def one(vs: dict, labelled, y_test, k, per, seed, others: list[str]) -> dict:
    from transferkit.training.adaptation import assess
    from transferkit.training.candidates.co_trained import PIXELS_SUFFICE, co_train, pixel_view
    from transferkit.training.candidates.self_trained import self_train
    from transferkit.training.probe import fit_probe

    y = labelled.labels
    rng = np.random.default_rng(seed)
    train, val, rows = pick_labels(y, k, per, rng)
    x0, x0_test = vs["efficientnet_lite0"]
    px, px_test = vs["pixels"]
    probe = fit_probe(x0[train], y[train], k, seed=seed)
    score = (lambda p: float((p.probabilities(x0_test).argmax(1) == y_test).mean()))  # noqa: E731
    out = {"probe": score(probe)}
    started = time.perf_counter()
    out["self-trained"] = score(self_train(probe, x0[train], y[train], x0[val], x0[rows], k,
                                           seed=seed).probe)
    out["self-trained s"] = time.perf_counter() - started
    found = assess([labelled.sources[i] for i in train], y[train], x0[train], probe.c, False,
                   seed)
    out["pixels / probe"] = found.pixel_accuracy / found.probe_accuracy
    started = time.perf_counter()
    features = (x0[train], x0[val], x0[rows])
    trained = co_train(probe, features, (px[train], px[rows]), pixel_view(k, False, seed),
                       y[train], k, seed=seed)
    out["co-trained"] = score(trained.probe)
    out["co-trained s"] = time.perf_counter() - started
    out["the run's pool row"] = (out["co-trained"] if out["pixels / probe"] >= PIXELS_SUFFICE
                                 else out["self-trained"])
    for name in others:
        x1 = vs[name][0]
        out[f"with {name}"] = score(co_train(probe, features, (x1[train], x1[rows]),
                                             probe_view(k, seed), y[train], k, seed=seed).probe)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["digits", "tuxpaint10", "digits_full"])
    parser.add_argument("--second", nargs="*", default=["efficientnet_lite2"],
                        help="other bases to try as the second view (not shipped)")
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    others = [b for b in args.second if b != "pixels"]
    header = False
    for name in args.sets:
        vs, labelled, y_test, k = views(args.data / name, ["pixels", *others])
        runs = [one(vs, labelled, y_test, k, args.per_class, s, others) for s in args.seeds]
        if not header:
            print("| set | " + " | ".join(runs[0]) + " |")
            print("|---" * (len(runs[0]) + 1) + "|")
            header = True
        cells = " | ".join(f"{np.mean([r[m] for r in runs]):.3f} ± "
                           f"{np.std([r[m] for r in runs]):.3f}" for m in runs[0])
        print(f"| {name} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
