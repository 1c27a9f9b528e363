"""Training: the story (train.py: config -> seed -> model -> LoRA -> data -> optimizer -> loop -> save) and its named
steps: preflight checks before any weights, one optimizer step (step.py), optimizer and precision (optim.py), the
loss (loss.py) and its fast path (fast/), evaluation during training, checkpoints, torchrun (distributed.py),
SIGINT/SIGTERM (interrupt.py), metrics; and ``phitune preview`` (preview.py), the data as training will see it.

Nothing is imported here, so ``phitune.training.interrupt`` stays a leaf the CLI can load without torch.
"""
