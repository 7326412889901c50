"""What a per-epoch checkpoint costs, against the epoch it protects (issue 12, item 6).

Measures, in interleaved rounds, medians of:
- a full checkpoint: the classifier with its optimizer state (runs.save_checkpoint), as
  written after every epoch that trains through the base;
- a head-only checkpoint: the head's weights, its best weights and the optimizer state
  (runs.save_head_state), as written after every epoch of a head on cached features;
- one epoch of that head on 300 cached feature vectors, for scale.

    python bench/checkpoint.py [--base efficientnet_lite0] [--size 224] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import transferkit  # noqa: F401  (sets the Keras backend)
from transferkit.quiet import load_tensorflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    load_tensorflow()
    import keras
    import numpy as np

    from transferkit.bases import build_base, get_base
    from transferkit.config import OptimizerConfig
    from transferkit.model import build_classifier, build_feature_extractor, build_head
    from transferkit.runs.checkpoints import save_checkpoint, save_head_state
    from transferkit.training.stages import compile_model

    spec = get_base(args.base)
    weights = "imagenet" if spec.imagenet.available() else "none"
    base = build_base(spec, args.size, weights)
    base.trainable = False
    model = build_classifier(build_feature_extractor(base, spec.preprocessing),
                             build_head(spec.feature_dim, 10))
    compile_model(model, OptimizerConfig(), 1e-3)
    head = model.get_layer("head")
    fitted = keras.Model(head.inputs, head.outputs)
    compile_model(fitted, model.optimizer, 1e-3)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, spec.feature_dim)).astype("float32")
    labels = rng.integers(0, 10, 300)
    fitted.fit(features, labels, epochs=1, verbose=0)  # traced and the optimizer built
    state = {"stage": "head", "epoch": 1, "history": [{"stage": "head", "epoch": 1}]}
    times: dict[str, list[float]] = {"full checkpoint": [], "head-only checkpoint": [],
                                     "head epoch on 300 features": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        for _ in range(args.rounds):
            start = time.perf_counter()
            save_checkpoint(run_dir, model, state)
            times["full checkpoint"].append(time.perf_counter() - start)
            start = time.perf_counter()
            weights_now = fitted.get_weights()
            save_head_state(run_dir, weights_now, weights_now,
                            [v.numpy() for v in model.optimizer.variables], state)
            times["head-only checkpoint"].append(time.perf_counter() - start)
            start = time.perf_counter()
            fitted.fit(features, labels, epochs=1, verbose=0, batch_size=32)
            times["head epoch on 300 features"].append(time.perf_counter() - start)
        sizes = {"full checkpoint": (run_dir / "checkpoints" / "last.keras").stat().st_size,
                 "head-only checkpoint":
                     (run_dir / "checkpoints" / "head_state.npz").stat().st_size}
    print(f"{spec.name} at {args.size} px ({weights} weights), medians of {args.rounds} "
          f"interleaved rounds:")
    print("| measure | seconds | file |")
    print("|---|---|---|")
    for name, values in times.items():
        size = f"{sizes[name] / 1e6:.2f} MB" if name in sizes else "-"
        print(f"| {name} | {statistics.median(values):.4f} | {size} |")


if __name__ == "__main__":
    main()
