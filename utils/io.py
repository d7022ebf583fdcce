"""Atomic file writes: every file this project writes goes through `atomic_write`.

A writer opens a fresh temporary name next to the target (same folder, so the rename
stays on one file system), writes, fsyncs and renames it over the target. A crash or an
exception at any moment leaves either the old file or the new one, never half of one;
a process killed mid-write leaves its temp file, which `remove_stale_temps` (one target)
or `remove_stale_temps_in` (a folder) deletes on the next run.

Temp names are `<target>.<pid>.<8 random hex digits>.tmp`: two writers of the same
target, in one process or several, get different ones (and the exclusive create
refuses a name already in use rather than write into it).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
from typing import IO, Any, Iterator

# what temp_name adds to the target's name: .<pid>.<8 hex digits>.tmp
_TEMP_SUFFIX = r"\.\d+\.[0-9a-f]{8}\.tmp"
_WRITE_MODES = ("wb", "w", "wt")


def temp_name(path: str | os.PathLike) -> str:
    """A fresh temporary name next to `path`."""
    return f"{os.fspath(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def is_temp_name(name: str | os.PathLike, target: str | os.PathLike | None = None) -> bool:
    """Whether `name` is a temp name (of `target`, when given) as made by `temp_name`."""
    name = os.fspath(name)
    if target is None:
        return re.fullmatch(".+" + _TEMP_SUFFIX, name, re.DOTALL) is not None
    target = os.fspath(target)
    return name.startswith(target) and re.fullmatch(_TEMP_SUFFIX, name[len(target):]) is not None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs) -> Iterator[IO]:
    """Context manager: a file open for writing on a temp name next to `path`; on success it
    is flushed, fsync'd and renamed over `path`; on any exception it is removed and `path`
    is left as it was. The file gets the usual permissions (0666 minus the umask, unlike
    mkstemp's 0600). `mode` is "wb" or "w"/"wt" (text; `open_kwargs` such as encoding or
    newline are passed to the file object).

        with atomic_write("out.json", "w") as f:
            json.dump(obj, f)
    """
    if mode not in _WRITE_MODES:
        raise ValueError(f"atomic_write mode must be one of {_WRITE_MODES}, got {mode!r}")
    path = os.fspath(path)
    tmp = temp_name(path)
    created = False

    def create(name: str, flags: int) -> int:
        nonlocal created
        # O_EXCL: never write into (or later delete) a file that someone else made
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        return fd

    try:
        with open(tmp, mode, opener=create, **open_kwargs) as f:  # f.name is the temp name
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as JSON (indent 2, no trailing newline), written atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)


def save_image(path: str | os.PathLike, array_or_image, format: str, **pil_kwargs) -> None:
    """Write a PIL image, or an array PIL can take (uint8 (H, W) -> 'L', (H, W, 3) -> 'RGB'),
    atomically in `format` ("PNG", "JPEG", ...); `pil_kwargs` go to `Image.save`."""
    from PIL import Image

    if isinstance(array_or_image, Image.Image):
        image = array_or_image
    else:
        import numpy as np

        image = Image.fromarray(np.asarray(array_or_image))
    with atomic_write(path) as f:
        # a file object has no extension to guess the format from
        image.save(f, format=format, **pil_kwargs)


def save_png(path: str | os.PathLike, array_or_image, **pil_kwargs) -> None:
    """`save_image` as PNG."""
    save_image(path, array_or_image, "PNG", **pil_kwargs)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """Make `dst` a copy of `src` atomically; returns "linked" or "copied".

    A hard link when the file system allows (no second write of a large file; atomic writes
    replace, never modify, a file, so the two names never see each other's later writes),
    else a byte copy."""
    tmp = temp_name(dst)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
        return "linked"
    except OSError:  # other file system, or links not supported
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with open(src, "rb") as f_src, atomic_write(dst) as f:
        shutil.copyfileobj(f_src, f, 16 << 20)
    return "copied"



def place_copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
    """`atomic_copy` of a file that a re-run may have placed already (an image hard-linked or
    copied into a prepared layout, never re-encoded): "present" when `dst` is that file or a
    finished copy of it (same size), else "linked" or "copied"."""
    if os.path.exists(dst) and (os.path.samefile(src, dst) or os.path.getsize(dst) == os.path.getsize(src)):
        return "present"
    return atomic_copy(src, dst)

def _remove(names: list[str]) -> list[str]:
    removed = []
    for name in names:
        try:
            os.unlink(name)
        except OSError:  # gone already (another run), or not ours to remove
            continue
        removed.append(name)
    return removed


def remove_stale_temps(path: str | os.PathLike) -> list[str]:
    """Delete the temp files that killed writers of `path` left behind; returns their names."""
    path = os.fspath(path)
    found = sorted(glob.glob(glob.escape(path) + ".*.tmp"))
    return _remove([name for name in found if is_temp_name(name, path)])


def remove_stale_temps_in(folder: str | os.PathLike) -> list[str]:
    """Delete every temp file (of any target) in `folder`; returns their names."""
    folder = os.fspath(folder)
    found = sorted(glob.glob(os.path.join(glob.escape(folder), "*.tmp")))
    return _remove([name for name in found if is_temp_name(os.path.basename(name))])
