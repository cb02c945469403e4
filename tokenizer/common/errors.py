"""User-facing errors: anything a user can cause (bad config, bad file, bad argument, missing weights).

Entry points catch `UserError`, print its one-line message and exit with status 2 instead of showing a
traceback. `UserError` is a `ValueError`, so a library caller can catch the misuse of a public function
the usual way. It is raised at the boundaries (config, files, command line, public API arguments); programming
errors stay ordinary exceptions.
"""

import sys


class UserError(ValueError):
    """A mistake or missing resource the user can fix; the message is one line and says how."""


class WeightsUnavailableError(UserError):
    """Pretrained weights (LPIPS, DINOv2, Inception, ...) could neither be found locally nor downloaded."""


class CheckpointMismatchError(UserError):
    """A checkpoint whose tensors do not fit the model (missing, unexpected or mis-shaped keys)."""


def one_line(error: BaseException, with_type: bool = False) -> str:
    """The user-facing line of any exception: its first non-empty line (after `TypeName: ` with with_type), or its
    type name.

    An error re-raised by a DataLoader worker carries the worker's traceback as text; its message is then the
    last line, after the `module.ErrorName: ` prefix.
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and any(line.startswith("Traceback") or "Original Traceback" in line for line in lines):
        line = lines[-1].split("Error: ", 1)[-1]
    else:
        line = lines[0]
    return f"{type(error).__name__}: {line}" if with_type else line


def run_cli(main, *args) -> int:
    """Run a command-line entry point: a UserError becomes `error: <one line>` on stderr and exit status 2."""
    try:
        main(*args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0
