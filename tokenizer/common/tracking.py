"""Experiment tracking through accelerate's trackers: `log_with=tensorboard | wandb | all` in both trainers' configs.

TensorBoard writes into the run directory (<run>/tensorboard/, as before). Weights & Biases (the optional extra
`pip install ".[wandb]"`) keeps its files in <run>/wandb/ and reads its usual environment: WANDB_PROJECT (default:
the trainer's name), WANDB_ENTITY, WANDB_MODE=offline (then `wandb sync` uploads later), WANDB_API_KEY. A resumed
run continues the same W&B run (its id is derived from the run directory).

Scalars go through `accelerator.log`; images through `ImageLog`, which hands a grid to every tracker that was started.
"""

import hashlib
import os

from tokenizer.common.errors import UserError

TRACKERS = {"tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}
TB_FOLDER = "tensorboard"  # <run>/tensorboard/events.out.tfevents.*


def check_log_with(value: str) -> str:
    """`value` if it names trackers that can start here; a one-line UserError otherwise."""
    if value not in TRACKERS:
        raise UserError(f"log_with={value!r}: choose one of {', '.join(TRACKERS)}")
    if "wandb" in TRACKERS[value]:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError(f"log_with={value} needs wandb: pip install '.[wandb]' (or log_with=tensorboard)") from None
    return value


def make_trackers(log_with: str, log_dir: str, project: str, run_name: str | None = None) -> list:
    """accelerate tracker objects for `log_with`, writing under `log_dir` (nothing starts before init_trackers)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    trackers = []
    for name in TRACKERS[check_log_with(log_with)]:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(TB_FOLDER, log_dir))
        else:
            run_id = hashlib.sha1(os.path.abspath(log_dir).encode()).hexdigest()[:16]
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", project), dir=log_dir, id=run_id,
                                         name=run_name or os.path.basename(os.path.normpath(log_dir)),
                                         resume="allow"))
    return trackers


class ImageLog:
    """`add_image(tag, image (3, H, W) float in [0, 1], step)` to every started tracker (TensorBoard, W&B)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def add_image(self, tag: str, image, step: int) -> None:
        for tracker in self.accelerator.trackers:
            tracker.log_images({tag: image[None]}, step=step)
