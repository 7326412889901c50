""""None of these": transferkit's novelty score against the scores the literature found
strongest, on two protocols, with one base's features or several side by side.

Protocols, per set:
- held-out: per seed a third of the classes (at least one) are unknown; a probe (transferkit's
  fit_probe) on the known classes' train features, each score fitted on their val split;
  known = their test split (sets without one: half of val, the other half fits), unknown =
  every val and test image of the held-out classes;
- external (`--unknown DIR`): every class is known; unknown = the images of DIR, categories
  from a source the set does not come from, in a similar style (bench/openclipart.py builds
  openclipart_unknown: clip-art categories that neither tuxpaint10 nor openclipart10 holds).

Scores (higher = less like any known class), each standardised on the val split that fits it:
- max-softmax: 1 - the probe's top probability (Hendrycks & Gimpel 2017);
- energy: -logsumexp of the probe's logits (Liu et al. 2020);
- k-NN, k = 1, 5, 10: cosine distance to the k-th nearest train image (Sun et al. 2022);
- Mahalanobis: to the nearest class mean, shared covariance, Ledoit-Wolf shrinkage, on
  normalised features (Lee et al. 2018);
- ViM: the norm outside the train features' 64 principal directions plus energy (Wang et al.
  2022);
- k-NN + max-softmax 1:1; transferkit's score (novelty.py: the same two, 2:1).
Reported: AUROC (known vs unknown), and the false-accept rate of unknown images at the
threshold the fit split sets for 95 % of known images (what `predict --reject-unknown` lets
through), mean ± sd over seeds.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data tuxpaint10 photos digits
    python bench/openclipart.py --out /tmp/tk-data
    python bench/novelty.py --sets tuxpaint10 openclipart10 \\
        --unknown /tmp/tk-data/openclipart_unknown \\
        --bases efficientnet_lite0 efficientnet_lite1 efficientnet_lite2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import transferkit  # noqa: F401  (sets the Keras backend)

VIM_DIMS = 64


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(an unknown image scores above a known one), ties counted half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))],
                               np.r_[known, unknown]))


def features(bases: list[str], config, images) -> np.ndarray:
    """Each base's cached frozen features, L2-normalised, side by side."""
    from transferkit.features import base_features, normalise
    from transferkit.reporting import NullReporter

    return np.hstack([normalise(base_features(b, "imagenet", config, images, NullReporter()))
                      for b in bases])


def scores(x_train: np.ndarray, y_train: np.ndarray, x_fit: np.ndarray, k: int,
           queries: dict[str, np.ndarray], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Every score of every query set, standardised on `x_fit` (known val images)."""
    from scipy.special import logsumexp
    from sklearn.covariance import LedoitWolf

    from transferkit.features import normalise
    from transferkit.novelty import fit_novelty, knn_distance
    from transferkit.training.probe import fit_probe

    probe = fit_probe(x_train, y_train, k, seed=seed)
    novelty = fit_novelty(x_train, x_fit, probe.probabilities(x_fit), seed=seed)
    bank = normalise(x_train).astype(np.float32)
    means = np.stack([bank[y_train == c].mean(0) for c in range(k)])
    precision = LedoitWolf().fit(bank - means[y_train]).precision_
    centre = bank.mean(0)
    principal = np.linalg.svd(bank - centre, full_matrices=False)[2][:VIM_DIMS]

    def raw(x: np.ndarray) -> dict[str, np.ndarray]:
        z = normalise(x).astype(np.float32)
        p = probe.probabilities(x)
        logits = x.astype(np.float64) @ probe.kernel + probe.bias
        d = z[:, None, :] - means[None]
        c = z - centre
        out = {"max-softmax": 1 - p.max(1), "energy": -logsumexp(logits, axis=1),
               "Mahalanobis": np.einsum("nkd,de,nke->nk", d, precision, d).min(1),
               "residual": np.linalg.norm(c - (c @ principal.T) @ principal, axis=1),
               "transferkit": novelty.score(x, p)}
        for kk in (1, 5, 10):
            out[f"k-NN, k={kk}"] = knn_distance(bank, z, kk)
        return out

    fit = raw(x_fit)

    def standard(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        z = {name: (v - fit[name].mean()) / max(fit[name].std(), 1e-9)
             for name, v in values.items()}
        z["ViM"] = z.pop("residual") + z["energy"]
        z["k-NN + max-softmax"] = z["k-NN, k=1"] + z["max-softmax"]
        return z

    return {name: standard(raw(x)) for name, x in queries.items()}


def threshold(fit: np.ndarray) -> float:
    """The score below which 95 % of the known images that fit it fall, as a run sets it."""
    return float(np.quantile(fit, 0.95, method="higher"))


def held_out(x: dict, y: dict, class_names, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    k = len(class_names)
    unknown_classes = rng.choice(k, max(1, k // 3), replace=False)
    known = np.setdiff1d(np.arange(k), unknown_classes)
    remap = np.full(k, -1)
    remap[known] = np.arange(len(known))

    def take(name: str, keep_known: bool) -> tuple[np.ndarray, np.ndarray]:
        mask = np.isin(y[name], known) == keep_known
        return x[name][mask], remap[y[name][mask]]

    x_train, y_train = take("train", True)
    x_fit, _ = take("val", True)
    if "test" in x:
        x_known, _ = take("test", True)
    else:  # half of val fits the score, the other half is scored
        order = rng.permutation(len(x_fit))
        x_known, x_fit = x_fit[order[: len(order) // 2]], x_fit[order[len(order) // 2:]]
    x_unknown = np.vstack([take(name, False)[0] for name in x if name != "train"])
    return scores(x_train, y_train, x_fit, len(known),
                  {"fit": x_fit, "known": x_known, "unknown": x_unknown}, seed)


def one_set(data: Path, bases: list[str], seeds: list[int], unknown: Path | None) -> list[dict]:
    from transferkit.config import DataConfig
    from transferkit.data.folders import load_labelled_folder, load_splits

    config = DataConfig(data_dir=data)
    splits = load_splits(data, config.val_split, config.seed)
    parts = {name: images for name, images in splits.items() if images is not None
             and len(images)}
    x = {name: features(bases, config, images) for name, images in parts.items()}
    y = {name: images.labels for name, images in parts.items()}
    runs = {f"held-out, seed {seed}": held_out(x, y, splits.class_names, seed)
            for seed in seeds}
    if unknown is not None and "test" in x:
        outside = load_labelled_folder(unknown, sorted(p.name for p in unknown.iterdir()
                                                       if p.is_dir()))
        runs[f"external: {unknown.name}"] = scores(
            x["train"], y["train"], x["val"], len(splits.class_names),
            {"fit": x["val"], "known": x["test"],
             "unknown": features(bases, config, outside)}, seeds[0])
    return [{"set": data.name, "bases": bases, "protocol": protocol.split(",")[0],
             "run": protocol, "score": score,
             "auroc": auroc(s["known"][score], s["unknown"][score]),
             "false_accept": float(np.mean(s["unknown"][score] <= threshold(s["fit"][score]))),
             "known": len(s["known"][score]), "unknown": len(s["unknown"][score])}
            for protocol, s in runs.items() for score in s["known"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["tuxpaint10", "photos", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--bases", nargs="+", default=["efficientnet_lite0"])
    parser.add_argument("--unknown", type=Path, help="a folder of category folders that no "
                        "set holds: the external protocol's unknowns")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    rows = [row for name in args.sets
            for row in one_set(args.data / name, args.bases, args.seeds, args.unknown)]
    if args.results:
        args.results.write_text(json.dumps(rows, indent=2))
    print(f"bases: {' + '.join(args.bases)}")
    protocols = list(dict.fromkeys((r["set"], r["protocol"]) for r in rows))
    for measure in ("auroc", "false_accept"):
        print("\nFalse accepts: unknown images below the threshold that passes 95 % of "
              "known val images" if measure == "false_accept" else "\nAUROC")
        print("| score | " + " | ".join(f"{s}, {p}" for s, p in protocols) + " |")
        print("|---" * (len(protocols) + 1) + "|")
        for score in dict.fromkeys(r["score"] for r in rows):
            cells = []
            for s, p in protocols:
                a = np.array([r[measure] for r in rows
                              if (r["set"], r["protocol"], r["score"]) == (s, p, score)])
                cells.append(f"{a.mean():.3f} ± {a.std():.3f}" if len(a) > 1
                             else f"{a[0]:.3f}")
            print(f"| {score} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
