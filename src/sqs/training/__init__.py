"""Training: one trainer (run directories, resume, DDP) and safetensors checkpoints."""
