"""Training: the loop and its components.

- `run.train(cfg, resume)`: distributed set-up, run folder, resume, fit (`python -m alip.train`).
- `trainer.Trainer`: the step-based loop over DDP; everything a resume needs is in its `state_dict()`.
- `step`: exact gradient accumulation for the contrastive loss (cached features), non-finite skips.
- `optim`: AdamW without decay on biases/norms/embeddings/logit_scale, and the schedules.
- `checkpoint`: atomic checkpoint files, keep-last-K, the latest complete one, RNG state.
- `logger`: rank-0 console lines, per-step losses JSONL, TensorBoard, optional wandb.
"""
