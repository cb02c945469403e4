"""Class-conditional DiT generator trained with flow matching on tokenizer latents (docs/ARCHITECTURE.md §8)."""

from dit.flow import guided_velocity, sample, training_loss
from dit.models import DiT, DiT_models, build_dit

__all__ = ["DiT", "DiT_models", "build_dit", "training_loss", "guided_velocity", "sample"]
