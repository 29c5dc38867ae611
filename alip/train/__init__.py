"""Training: optimizer and schedule (optim.py). The loop, checkpoints and entry point are to come."""
