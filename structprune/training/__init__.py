"""Training: distillation from the unpruned teacher, losses, and the Trainer callbacks for gated models."""
