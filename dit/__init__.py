"""Class-conditional DiT generator trained with flow matching on tokenizer latents."""

from dit.flow import (
    apply_time_shift,
    flow_matching_loss,
    guided_velocity,
    sample,
    sample_t,
    time_grid,
)
from dit.models import DiT, DiT_models, build_dit

__all__ = [
    "DiT",
    "DiT_models",
    "build_dit",
    "apply_time_shift",
    "sample_t",
    "flow_matching_loss",
    "time_grid",
    "guided_velocity",
    "sample",
]
