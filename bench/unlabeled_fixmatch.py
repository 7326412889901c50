"""`--unlabeled` by consistency while fine-tuning (FixMatch, Sohn et al. 2020), issue 35: does
fine-tuning the base on the pool's weak/strong views gain +3 test points at 5 labels a class
where the offline routes (self-training, co-training, label spreading; bench/README.md)
gained +0.3 on tuxpaint10?

Per set and seed, bench/unlabeled_cli.py's cut: 5 images a class of train (drawn by the
seed) labelled, the rest of train the pool, the set's own val and test. Lite0 at 224 px, its
top 2 blocks unfrozen (transferkit's default depth on ImageNet-like data), the head started
from the probe on the labelled images' frozen features (LP-FT), Adam at transferkit's
fine-tuning rate 1e-4 on a cosine decay, the same epochs and steps in each arm:
  probe     the probe alone (the start of both arms);
  finetune  the labelled images, weakly augmented (transferkit's default warp and flips);
  fixmatch  the same, plus per step a batch of the pool: each image's weak view labels it
            where the model is surer than --threshold, and the model learns that label from
            the image's strong view (the weak warp, then RandAugment's 2 operations and a
            random erase), weighted by --weight.
Each arm is scored on test at its last epoch and at its best val epoch (val averaged over 3
epochs, as transferkit chooses).

    python -m bench.unlabeled_fixmatch --sets tuxpaint10 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.unlabeled_cli import cut
from transferkit.data.folders import load_splits

BASE, SIZE, BLOCKS, RATE = "efficientnet_lite0", 224, 2, 1e-4


def load(sources: list[str]) -> np.ndarray:
    from transferkit.data.pipeline import build_dataset

    ds = build_dataset(sources, None, SIZE, 64)
    return np.concatenate([np.asarray(b) for b in ds]).astype(np.float32)


def run_arm(arm: str, data: dict, seed: int, epochs: int, threshold: float, weight: float
            ) -> dict:
    import keras
    import tensorflow as tf

    from transferkit.augment import build_augmentation_layers
    from transferkit.bases import build_base, get_base
    from transferkit.config import AugmentConfig
    from transferkit.model import PREDICTIONS, build_classifier, build_feature_extractor, build_head
    from transferkit.training.freezing import unfreeze_top_blocks
    from transferkit.training.probe import fit_probe

    keras.utils.set_random_seed(seed)
    spec = get_base(BASE)
    base = build_base(spec, SIZE, "imagenet")
    extractor = build_feature_extractor(base, spec.preprocessing)
    k = data["k"]
    x, y = data["train"]
    features = extractor.predict(x, batch_size=32, verbose=0)
    probe = fit_probe(features, y, k, seed=seed)
    head = build_head(features.shape[1], k)
    head.get_layer(PREDICTIONS).set_weights([probe.kernel, probe.bias])
    model = build_classifier(extractor, head)

    def score(split: str) -> float:
        xs, ys = data[split]
        return float(np.mean(model.predict(xs, batch_size=64, verbose=0).argmax(1) == ys))

    rows = [{"epoch": 0, "val": score("val"), "test": score("test")}]
    if arm == "probe":
        return {"last": rows[0]["test"], "chosen": rows[0]["test"], "rows": rows}
    unfreeze_top_blocks(base, spec, BLOCKS, False)
    weak = build_augmentation_layers(AugmentConfig(), seed=seed)
    strong = keras.Sequential([
        build_augmentation_layers(AugmentConfig(), seed=seed + 1),
        keras.layers.RandAugment(value_range=(0, 255), num_ops=2, seed=seed + 2),
        keras.layers.RandomErasing(factor=1.0, scale=(0.02, 0.25), value_range=(0, 255),
                                   seed=seed + 3)])
    pool = data["pool"]
    batch, pool_batch = 16, 32
    steps = max(1, len(pool) // pool_batch)  # one pass over the pool an epoch, both arms
    schedule = keras.optimizers.schedules.CosineDecay(RATE, epochs * steps)
    optimizer = keras.optimizers.Adam(schedule)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    rng = np.random.default_rng(seed)
    masked = []

    @tf.function
    def step(xl, yl, xu):
        with tf.GradientTape() as tape:
            loss = loss_fn(yl, model(weak(xl, training=True), training=True))
            if xu is not None:
                guess = tf.stop_gradient(model(weak(xu, training=True), training=True))
                keep = tf.cast(tf.reduce_max(guess, axis=1) >= threshold, tf.float32)
                p = model(strong(xu, training=True), training=True)
                each = keras.losses.sparse_categorical_crossentropy(tf.argmax(guess, 1), p)
                loss += weight * tf.reduce_mean(keep * each)
            else:
                keep = tf.zeros([1])
        variables = model.trainable_variables
        optimizer.apply(tape.gradient(loss, variables), variables)
        return tf.reduce_mean(keep)

    for epoch in range(1, epochs + 1):
        pool_order = rng.permutation(len(pool))
        for s in range(steps):
            li = rng.choice(len(x), batch, replace=len(x) < batch)
            xu = pool[pool_order[s * pool_batch:(s + 1) * pool_batch]] if arm == "fixmatch" \
                else None
            masked.append(float(step(x[li], y[li], xu)))
        rows.append({"epoch": epoch, "val": score("val"), "test": score("test"),
                     "mask": statistics.mean(masked[-steps:])})
    smooth = [statistics.mean(r["val"] for r in rows[max(1, i - 1):i + 2])
              for i in range(1, len(rows))]
    best = rows[1 + int(np.argmax(smooth))]
    return {"last": rows[-1]["test"], "chosen": best["test"], "chosen_epoch": best["epoch"],
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["tuxpaint10"])
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--arms", nargs="+", default=["probe", "finetune", "fixmatch"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tk-fixmatch"))
    parser.add_argument("--results", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    for name in args.sets:
        found: dict[str, list[dict]] = {arm: [] for arm in args.arms}
        for seed in args.seeds:
            labelled, pool = cut(args.data / name, args.per_class, seed,
                                 args.work / f"{name}-{seed}")
            splits = load_splits(labelled, 0.2, seed)
            data: dict = {split: (load(images.sources), images.labels) for split, images in
                          (("train", splits.train), ("val", splits.val), ("test", splits.test))}
            data["k"] = len(splits.class_names)
            data["pool"] = load(sorted(str(p) for p in pool.iterdir()))
            for arm in args.arms:
                start = time.perf_counter()
                got = run_arm(arm, data, seed, args.epochs, args.threshold, args.weight)
                got |= {"set": name, "seed": seed, "arm": arm,
                        "seconds": round(time.perf_counter() - start, 1),
                        "threshold": args.threshold, "weight": args.weight}
                found[arm].append(got)
                print(json.dumps({k: v for k, v in got.items() if k != "rows"}), flush=True)
                if args.results:
                    with args.results.open("a") as f:
                        f.write(json.dumps(got) + "\n")
        print("\n| set | arm | test, last epoch | test, chosen epoch | mean s |")
        print("|---|---|---|---|---|")
        for arm, rows in found.items():
            last = [r["last"] for r in rows]
            chosen = [r["chosen"] for r in rows]
            print(f"| {name} | {arm} | {statistics.mean(last):.3f} ± "
                  f"{statistics.pstdev(last):.3f} | {statistics.mean(chosen):.3f} ± "
                  f"{statistics.pstdev(chosen):.3f} | "
                  f"{statistics.mean(r['seconds'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
