"""Training: the loop and its components.

- `run.train(cfg, resume, reshard)`: distributed set-up, run folder lock, resume (`--reshard`: on another
  number of ranks or changed shards), fit (`python -m alip.train`).
- `resume`: what a resume may change (applied and named, or refused and named).
- `trainer.Trainer`: the step-based loop over DDP; everything a resume needs is in its `state_dict()`.
- `step`: exact gradient accumulation for the contrastive loss (cached features), non-finite skips.
- `optim`: AdamW with the weight-decay rule of `optim.decay_params`, and the schedules.
- `checkpoint`: atomic checkpoint files, keep-last-K, the latest complete one, RNG state.
- `logger`: rank-0 console lines, per-step losses JSONL, TensorBoard, optional wandb.
"""
