"""Training engine: trainer, optimisers and schedules, checkpoints, logging."""
