"""Training: stages with schedules and early stopping, the staged finetune with checkpoints
and resume, and the textbook sanity checks (overfit a tiny subset, learning-rate range test)."""

from transferkit.training.finetune import (
    FINETUNE,
    HEAD,
    FinetuneResult,
    data_summary,
    finetune,
    plan_stages,
    report_data,
    resume_finetune,
    split_rows,
)
from transferkit.training.stages import (
    StagePlan,
    StageResult,
    class_weights,
    learning_rate_at,
    run_stage,
    stage_result,
)

__all__ = [
    "FINETUNE", "HEAD", "FinetuneResult", "StagePlan", "StageResult", "class_weights",
    "data_summary", "finetune", "learning_rate_at", "plan_stages", "report_data",
    "resume_finetune", "run_stage", "split_rows", "stage_result",
]
