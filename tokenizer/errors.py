"""User-facing errors: anything a user can cause (bad config, bad file, missing weights).

Entry points catch `UserError`, print its one-line message and exit with status 2 instead of
showing a traceback. Programming errors stay ordinary exceptions.
"""


class UserError(Exception):
    """A mistake or missing resource the user can fix; the message is one line and says how."""


class WeightsUnavailableError(UserError):
    """Pretrained weights (LPIPS, DINOv2, Inception, ...) could neither be found locally nor downloaded."""


class CheckpointMismatchError(UserError):
    """A checkpoint whose tensors do not fit the model (missing, unexpected or mis-shaped keys)."""
