"""Errors a user can cause: reported as one line on stderr with exit code 2; and the
helpers that turn any exception into that one line."""
import sys
import traceback
import warnings


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


def run_command(get_parser, run, argv=None) -> int:
    """A command line's whole life: parse `argv` with get_parser() (whose --debug flag shows
    tracebacks), then return run(args)'s exit code. A missing requirement (ImportError while
    building the parser) and a UserError are one line `error: ...` and exit 2; Ctrl-C is
    'interrupted' and 130; any other exception one line with its type and exit 1."""
    try:
        parser = get_parser()
    except ImportError as e:
        print(f"error: {e}; install the requirements (./run_tests.sh or env.sh set up an environment)", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return run(args)
    except KeyboardInterrupt as e:
        release_frames(e)
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        release_frames(e)
        if isinstance(e, UserError):
            print(f"error: {error_message(e)}", file=sys.stderr)
            return 2
        if not args.debug:
            print(f"error: {type(e).__name__}: {error_message(e)} (run with --debug for the traceback)", file=sys.stderr)
        return 1
