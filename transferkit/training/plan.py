"""Resolving a finetune once: the config as the user gave it, plus what the data, the
learning-rate range test and the data checks decided, into one frozen Plan (recorded in
run.json). The stages read the Plan; nothing writes back into the config.

What the user set stands over the checks: --unfreeze-blocks, --[no-]horizontal-flip, and
--finetune-lr with its warm-up. The Plan lists those that stood against a finding, so the
console's "given and kept over that" line is derived, not hand-kept.
"""

from __future__ import annotations

import dataclasses

from transferkit.bases import BaseSpec
from transferkit.config import TOP_BLOCKS, FinetuneConfig
from transferkit.runs.records import Adaptation, Plan
from transferkit.training.stages import StagePlan

PROBE, HEAD, FINETUNE = "probe", "head", "finetune"  # the candidates, simplest first

# Tuning every block: three times the default fine-tuning rate, reached over two warm-up
# epochs. On digits (seed 0, val right of 100; the probe 92): 1e-4 gave 94, 3e-4 gave 95, and
# 3e-4 after warm-up 96. Without warm-up the first epoch at 3e-4 fell to 21 right before
# climbing back; with it, to 82.
DEEP_LR_SCALE = 3.0
DEEP_WARMUP_EPOCHS = 2
# Fine-tuning epochs by default, and when every block is tuned. On digits (test, seeds 0/1):
# 10 epochs scored 0.930/0.950, 20 scored 0.970/0.970 (bench/README.md, issue 22); the
# off-course rule still stops a stage that is not gaining.
FINETUNE_EPOCHS = 10
DEEP_FINETUNE_EPOCHS = 20
# Label smoothing when every block is tuned (far data, a few hundred images, the whole base
# free to fit them): through the CLI, 3 seeds, digits test 0.98 / 0.95 / 0.90 without it and
# 0.98 / 0.97 / 0.96 with it (in seed 2 the fine-tuned model then won on val by more than
# noise, 96 against the probe's 93; bench/README.md, issue 37). Near ImageNet it stays off.
DEEP_LABEL_SMOOTHING = 0.1


def build_plan(config: FinetuneConfig, spec: BaseSpec, learning_rate: float | None = None,
               found: Adaptation | None = None,
               class_weights: dict[str, float] | None = None) -> Plan:
    """The resolved plan: `learning_rate` is lr-find's suggestion (None: as given), `found`
    the data checks' findings (None: not run), `class_weights` the balanced weights."""
    rate = config.learning_rate if learning_rate is None else learning_rate
    finetune_lr = config.finetune_lr if config.finetune_lr is not None else rate / 10
    blocks = config.unfreeze_blocks if config.unfreeze_blocks is not None else TOP_BLOCKS
    schedule = config.finetune_schedule
    flip = config.augment.horizontal_flip
    if flip is None:  # not set by the user: the checks decide, else flips are on
        flip = not (found is not None and found.mirror_changes_labels)
    deep = found is not None and found.deep
    epochs = config.finetune_epochs
    if epochs is None:
        epochs = DEEP_FINETUNE_EPOCHS if deep else FINETUNE_EPOCHS
    smoothing = config.label_smoothing
    if smoothing is None:
        smoothing = DEEP_LABEL_SMOOTHING if deep else 0.0
    if deep and config.unfreeze_blocks is None:
        blocks = len(spec.blocks)
        if config.finetune_lr is None:
            finetune_lr *= DEEP_LR_SCALE
            schedule = dataclasses.replace(
                schedule, warmup_epochs=max(schedule.warmup_epochs, DEEP_WARMUP_EPOCHS))
    return Plan(learning_rate=rate, unfreeze_blocks=blocks if epochs else 0, finetune_epochs=epochs,
                finetune_lr=finetune_lr, schedule=config.schedule, finetune_schedule=schedule,
                augment=dataclasses.replace(config.augment, horizontal_flip=flip),
                class_weights=class_weights, label_smoothing=smoothing,
                stood=_stood(config, found))


def _stood(config: FinetuneConfig, found: Adaptation | None) -> tuple[str, ...]:
    """The options the user set that stand against what the checks found."""
    if found is None:
        return ()
    stands = []
    if found.deep and config.unfreeze_blocks is not None:
        stands.append(f"--unfreeze-blocks {config.unfreeze_blocks}")
    elif found.deep and config.finetune_lr is not None:
        stands.append(f"--finetune-lr {config.finetune_lr:g}")
    if found.mirror_changes_labels and config.augment.horizontal_flip:
        stands.append("--horizontal-flip")
    return tuple(stands)


def plan_stages(config: FinetuneConfig, plan: Plan, spec: BaseSpec) -> list[StagePlan]:
    """The epoch-based stages after the probe: the head on the frozen base (when --epochs),
    then, unless --finetune-epochs 0, the top blocks."""
    stages = []
    if config.epochs:
        stages.append(StagePlan(HEAD, f"train the head on the frozen {spec.name} base", 0,
                                config.epochs, plan.learning_rate, plan.schedule))
    epochs = plan.finetune_epochs if plan.finetune_epochs is not None else config.finetune_epochs
    if epochs:
        top = spec.blocks[-plan.unfreeze_blocks:]
        stages.append(StagePlan(
            FINETUNE, f"fine-tune block{'s' if len(top) > 1 else ''} {', '.join(top)} "
                      f"(BatchNorm {'trainable' if config.train_batchnorm else 'frozen'})",
            config.epochs, config.epochs + epochs, plan.finetune_lr,
            plan.finetune_schedule, "--finetune-lr"))
    return stages


def trains_on_images(stage: str, plan: Plan) -> bool:
    """Whether a stage trains on images (and so on a pool candidate's labelled images too);
    otherwise (the head without augmentation) it trains on train's cached frozen features."""
    return stage != HEAD or plan.augment.enabled
