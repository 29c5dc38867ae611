"""Training: optimizer and schedules (optim.py), checkpoint files (checkpoint.py).

The loop and the entry point are still to come (the trainer issue).
"""
