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


def one_line(error: Exception) -> str:
    """The user-facing line of an error; DataLoader workers wrap it in a traceback, whose last line it is."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return lines[-1].split("Error: ", 1)[-1]


def run_cli(main, *args) -> int:
    """Run a command-line entry point: a UserError becomes `error: <one line>` on stderr and exit status 2."""
    import sys

    try:
        main(*args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
