"""Output paths of the command line, checked before any work starts.

Every file or folder a subcommand writes (``--out``, ``--json``, ``--csv``, ``--plot``, ``--trace``,
``-o``...) goes through :func:`check_file` or :func:`check_folder` first, so that a path that cannot
be written is refused in one sentence before a model loads, not with a traceback after the work.

The rules, the same for every command (:data:`RULES`, shown in ``--help``):

- a file gets the suffix of what is written (``.json``, ``.csv``, ``.png``, ``.md``,
  ``.safetensors``): a name without a suffix gets it added, and the command prints the name it
  really wrote; a name with another suffix is refused;
- a folder where a file is expected (or a file where a folder is expected) is refused;
- a place where nothing can be created (``/proc``, a read-only folder) is refused: writability is
  tested by creating and removing a probe file, not guessed from permission bits;
- missing parent folders are created when the output is written (:func:`ready`), so a refused or
  failed run leaves no empty folders behind (``viz`` creates them just before its one prefill, since
  :func:`tokenpress.tools.viz.visualize` writes the picture itself).
"""

from __future__ import annotations

import errno
import importlib.util
import os
import tempfile
from pathlib import Path

from tokenpress.core.errors import InputError

#: What ``--help`` says about output paths.
RULES = ("Output paths are checked before any work starts: a file name without a suffix gets the expected one "
         "added (and the name written is printed), another suffix is refused, and missing parent folders are "
         "created.")

_PROBE_PREFIX = ".tokenpress-probe-"


def _reason(exc: OSError) -> str:
    """Why a probe failed, in words (an existing folder that refuses new files says ENOENT, as /proc does)."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOENT:
        return "it does not accept new files"
    return (exc.strerror or str(exc)).lower()


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a folder that cannot be searched: treat as absent, the probe says why
        return False


def _probe_folder(folder: Path, option: str, shown: str) -> None:
    """Create and remove a file in ``folder``, the only sure test that something can be written there."""
    try:
        handle, probe = tempfile.mkstemp(prefix=_PROBE_PREFIX, dir=folder)
    except OSError as exc:
        raise InputError(f"{option} {shown}: cannot create files in {folder} ({_reason(exc)})") from None
    os.close(handle)
    os.unlink(probe)


def _probe_nearest_folder(path: Path, option: str, shown: str) -> None:
    """``path`` does not exist: check that its nearest existing ancestor is a folder one can write in
    (the missing folders between them are created when the output is written)."""
    for ancestor in path.absolute().parents:
        if _exists(ancestor):
            if not ancestor.is_dir():
                raise InputError(f"{option} {shown}: {ancestor} is a file, not a folder")
            _probe_folder(ancestor, option, shown)
            return


def check_file(text: str, option: str, suffix: str, what: str) -> Path:
    """The file ``option`` names, refused in one sentence unless it can hold ``what`` (its ``suffix``
    is added when missing): returns the path that will be written."""
    path = Path(text)
    if text.endswith(("/", os.sep)):
        raise InputError(f"{option} {text}: names a folder (it ends in {text[-1]}), but a file name is needed for "
                         f"{what}")
    if path.is_dir():  # checked before a suffix is added: DIR means the folder, not DIR.json
        raise InputError(f"{option} {text}: is a folder, but a file name is needed for {what}")
    if not path.suffix:
        path = Path(text + suffix)
    elif path.suffix.lower() != suffix:
        raise InputError(f"{option} {text}: a {suffix} file is needed for {what}; use a name ending in {suffix} "
                         f"(or none, and {suffix} is added)")
    shown = str(path)
    if path.is_dir():
        raise InputError(f"{option} {shown}: is a folder, but a file name is needed for {what}")
    if _exists(path):
        try:  # opened for appending and closed: the file is left as it is (non-blocking: a FIFO never hangs)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)))
        except OSError as exc:
            raise InputError(f"{option} {shown}: cannot write this file ({_reason(exc)})") from None
        return path
    _probe_nearest_folder(path, option, shown)
    return path


def _check_matplotlib(option: str, shown: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(f"{option} {shown}: plots need matplotlib: pip install 'tokenpress[plot]'")


def check_plot(text: str, option: str, what: str = "a plot") -> Path:
    """:func:`check_file` for a matplotlib PNG, also refused up front when matplotlib is missing."""
    path = check_file(text, option, ".png", what)
    _check_matplotlib(option, str(path))
    return path


def check_folder(text: str, option: str, what: str, plots: bool = False) -> Path:
    """The folder ``option`` names (existing or to be created), refused in one sentence unless ``what``
    can be written into it (``plots``: matplotlib plots, so matplotlib must be installed)."""
    path = Path(text)
    if _exists(path):
        if not path.is_dir():
            raise InputError(f"{option} {text}: is a file, but a folder is needed for {what}")
        _probe_folder(path, option, text)
    else:
        _probe_nearest_folder(path, option, text)
    if plots:
        _check_matplotlib(option, text)
    return path


def ready(path: Path) -> Path:
    """Create the missing parent folders of a checked file, just before it is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a checked file (missing parent folders created)."""
    ready(path).write_text(text, encoding="utf-8")
    return path


__all__ = ["RULES", "check_file", "check_folder", "check_plot", "ready", "write_text"]
