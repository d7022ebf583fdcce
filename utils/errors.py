"""Errors a user can cause: reported as one line on stderr with exit code 2; and the
helpers that turn any exception into that one line."""
import traceback


class UserError(Exception):
    """Bad input (a file, a flag, a checkpoint): the message says what and how to fix it."""


def error_message(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker, the original
    message without the worker's traceback that torch puts in front of it."""
    msg = str(e)
    if "Original Traceback" in msg:
        marker = f"{type(e).__name__}: "
        tail = msg.rsplit(marker, 1)[-1] if marker in msg else msg.strip().splitlines()[-1]
        msg = tail.strip()
    return msg


def release_frames(e: BaseException) -> None:
    """Clear the locals of the finished frames an exception (and its causes) went through.
    An error re-raised from a DataLoader worker is in a reference cycle with those frames,
    which would keep the loader and its worker processes alive until a later garbage
    collection, which cannot shut them down cleanly (in-process callers, such as tests)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__
