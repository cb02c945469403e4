"""Atomic writes: a file or a whole directory appears complete or not at all, and a failed write keeps the old one.

    with atomic_directory("runs/jobs/x/checkpoints/last") as tmp:   # write everything into tmp ...
        save_file(..., os.path.join(tmp, "model.safetensors"))
    # ... then it is swapped in by renames; on an error tmp is removed and the old directory stays

A directory swap renames the old directory to `<dir>.old` before renaming the new one into place; a reader that
finds no `<dir>` (a kill between the two renames) falls back to `<dir>.old` (`existing_version`), so there is no
moment at which a kill loses the last complete version. Temporary names carry the writer's pid.
"""

import os
import shutil
from contextlib import contextmanager

from tokenizer.errors import UserError, one_line


def temporary_sibling(path: str) -> str:
    """`<parent>/.tmp-<name>-<pid>`: where `path` is written before it is swapped in."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".tmp-{name}-{os.getpid()}")


def explain_write_error(error: OSError, target: str) -> UserError:
    """A full disk, a read-only filesystem or a quota, as a one-line error that says the old version is kept."""
    return UserError(f"could not write {target}: {error.strerror or one_line(error)}; the previous version is kept")


def swap_in(tmp: str, directory: str) -> None:
    """Replace `directory` by the complete directory `tmp`, with renames only (see the module docstring)."""
    old = directory + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(directory):
        os.rename(directory, old)
    os.rename(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def existing_version(directory: str, marker: str) -> str | None:
    """`directory`, or `<directory>.old` after a kill mid-swap, whichever holds the file `marker`; else None."""
    for candidate in (directory, directory + ".old"):
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    return None


@contextmanager
def atomic_directory(directory: str):
    """Yield an empty temporary directory; when the block ends without error, swap it in as `directory`.

    Every file written inside is fsynced before the swap, so the renames never expose unwritten bytes. An OSError
    while writing becomes a one-line UserError; on any error the temporary directory is removed.
    """
    os.makedirs(os.path.dirname(os.path.abspath(directory)), exist_ok=True)
    tmp = temporary_sibling(directory)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        yield tmp
        for entry in os.listdir(tmp):
            with open(os.path.join(tmp, entry), "rb") as f:
                os.fsync(f.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_write_error(e, directory) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, directory)


def atomic_file(path: str, write) -> None:
    """`write(tmp_path)` into a temporary sibling, then `os.replace` it onto `path` (atomic on POSIX)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise explain_write_error(e, path) from None


def atomic_json(path: str, obj) -> None:
    """Write `obj` as indented JSON to `path` with `atomic_file`."""
    import json

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_file(path, write)
