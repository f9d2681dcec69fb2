"""Training: data, sample assembly, losses, the trainer and the stage-3 distillation parts."""
