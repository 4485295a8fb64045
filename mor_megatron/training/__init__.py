"""Training: DeepSpeed engine, train step, checkpoints and the pretraining loop."""
