"""Training: one stage (stages), getting a run ready (prepare), the staged finetune with
checkpoints and resume (finetune), and the textbook's sanity checks (checks).

Kept free of imports so that `transferkit.training.X` loads only what X needs."""
