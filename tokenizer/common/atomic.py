"""Atomic writes: a file or a whole directory appears complete or not at all, and a failed write keeps the old one.

    with atomic_directory("runs/jobs/x/checkpoints/last") as tmp:   # write everything into tmp ...
        save_file(..., os.path.join(tmp, "model.safetensors"))
    # ... then it is swapped in by renames; on an error tmp is removed and the old directory stays

A directory swap renames the old directory to `<dir>.old` before renaming the new one into place; a reader that
finds no `<dir>` (a kill between the two renames) falls back to `<dir>.old` (`existing_version`), so there is no
moment at which a kill loses the last complete version. Temporary names carry the writer's pid
(`.tmp-<name>-<pid>` for a directory, `<file>.tmp-<pid>` for a file): a kill leaves them behind, and the next
start removes those of processes that no longer exist (`remove_stale_temporaries`) and settles a half-done swap
(`settle`).
"""

import json
import os
import re
import shutil
from contextlib import contextmanager

from safetensors import SafetensorError

from tokenizer.common.errors import UserError, one_line

# What a failed write raises: the OS's errors, and safetensors' (it reports a full disk as a SafetensorError).
WRITE_ERRORS = (OSError, SafetensorError)
_TEMPORARY = re.compile(r"^\.tmp-.+-(\d+)$|^.+\.tmp-(\d+)$")


def temporary_sibling(path: str) -> str:
    """`<parent>/.tmp-<name>-<pid>`: where `path` is written before it is swapped in."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".tmp-{name}-{os.getpid()}")


def explain_write_error(error: BaseException, target: str) -> UserError:
    """A full disk, a read-only filesystem or a quota, as a one-line error that says the old version is kept."""
    why = getattr(error, "strerror", None) or one_line(error)
    return UserError(f"could not write {target}: {why}; the previous version is kept")


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


def settle(directory: str, marker: str) -> None:
    """Finish a swap a kill interrupted: the complete version (holding `marker`) becomes `directory` again and
    `<directory>.old` goes. Only for a directory no live process is writing (a run's main process at start)."""
    old = directory + ".old"
    if not os.path.isdir(old):
        return
    if not os.path.isfile(os.path.join(directory, marker)) and os.path.isfile(os.path.join(old, marker)):
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(old, directory)
    else:
        shutil.rmtree(old, ignore_errors=True)


def process_exists(pid: int) -> bool:
    """True when a process with this pid runs on this machine (a zombie counts); the caller's own pid included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_temporaries(folder: str) -> list:
    """Remove the temporary files and directories in `folder` whose writer no longer runs (killed mid-write, or
    stopped by a full disk before it could clean up); returns their names. Those of live processes stay, except
    this process's own, which no write of this process has started yet when a run starts."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        m = _TEMPORARY.match(name)
        if not m:
            continue
        pid = int(m.group(1) or m.group(2))
        if pid != os.getpid() and process_exists(pid):
            continue
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        removed.append(name)
    return removed


@contextmanager
def atomic_directory(directory: str):
    """Yield an empty temporary directory; when the block ends without error, swap it in as `directory`.

    Every file written inside is fsynced before the swap, so the renames never expose unwritten bytes. A failed
    write (an OSError, or a SafetensorError such as a full disk) becomes a one-line UserError; on any error the
    temporary directory is removed.
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
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise explain_write_error(e, directory) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, directory)


def atomic_file(path: str, write) -> None:
    """`write(tmp_path)` into a temporary sibling, fsync it, then `os.replace` it onto `path` (atomic on POSIX), so
    the rename never exposes unwritten bytes. On any error the temporary is removed; a failed write (full disk,
    ...) becomes a one-line UserError."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, WRITE_ERRORS):
            raise explain_write_error(e, path) from None
        raise


def atomic_json(path: str, obj) -> None:
    """Write `obj` as indented JSON to `path` with `atomic_file` (its folder created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    atomic_file(path, write)
