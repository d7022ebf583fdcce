"""Errors a user can cause: reported as one line on stderr with exit code 2; and the
helpers that turn any exception into that one line."""
import sys
import traceback
import warnings


class UserError(Exception):
    """Bad input (a file, a flag, a checkpoint): the message says what and how to fix it."""


class SharedError(Exception):
    """An error that every process of a torchrun run raises together, because one of them
    met it (utils.dist.shared_error, which has printed its line already): each process exits
    with the code of the original error and prints nothing more."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.code = code


def error_message(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker, the original
    message without the worker's traceback that torch puts in front of it."""
    msg = str(e)
    if "Original Traceback" in msg:
        marker = f"{type(e).__name__}: "
        tail = msg.rsplit(marker, 1)[-1] if marker in msg else msg.strip().splitlines()[-1]
        msg = tail.strip()
    return msg


def one_line(e: BaseException) -> tuple[str, int]:
    """What run_command reports for `e`: its line on stderr and the exit code (a UserError:
    its message and 2; any other error: its type and message and 1)."""
    if isinstance(e, UserError):
        return f"error: {error_message(e)}", 2
    return f"error: {type(e).__name__}: {error_message(e)} (run with --debug for the traceback)", 1


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


def run_main(parse_args, prepare, argv=None) -> int:
    """The entry point of a data preparation script (no --debug flag): prepare(parse_args(argv));
    a UserError is one line `error: ...` and exit 2, any other error its traceback."""
    args = parse_args(argv)
    try:
        return prepare(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_command(get_parser, run, argv=None) -> int:
    """A command line's whole life: parse `argv` with get_parser() (whose --debug flag shows
    tracebacks), then return run(args)'s exit code. A missing requirement (ImportError while
    building the parser) and a UserError are one line `error: ...` and exit 2; Ctrl-C is
    'interrupted' and 130; any other exception one line with its type and exit 1. A
    SharedError (torchrun) exits with the code of the error behind it, its line printed already."""
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
        if isinstance(e, SharedError):
            return e.code
        line, code = one_line(e)
        if code == 2 or not args.debug:
            print(line, file=sys.stderr)
        return code
