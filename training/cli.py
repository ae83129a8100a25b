"""Command-line plumbing shared by every script: a user's mistake ends in one `error:` line and exit status 2."""

import argparse
import errno
import sys
from collections.abc import Callable

# What to do about the operating-system errors a user can cause (a full disk, a read-only or wrong --out, ...).
_OS_FIXES = {
    errno.ENOSPC: "free disk space or write somewhere else",
    errno.EDQUOT: "free disk space or write somewhere else",
    errno.EACCES: "check the permissions, or write somewhere else",
    errno.EPERM: "check the permissions, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a path component is a file, not a folder: pick another path",
    errno.EISDIR: "the path is a folder, where a file is expected",
    errno.EEXIST: "the path exists already: pick another one",
}


class UserError(ValueError):
    """A mistake in what the user gave (option, file, data); the message names it and the fix."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one `error:` line (exit 2) instead of a usage dump."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def describe(e: BaseException) -> str:
    """One line for a user error: the message, and for an OSError the file and the fix."""
    if isinstance(e, OSError) and not isinstance(e, UserError):
        where = f" ({e.filename})" if e.filename else ""
        fix = _OS_FIXES.get(e.errno or -1)
        return f"{e.strerror or e}{where}" + (f"; {fix}" if fix else "")
    return " ".join(str(e).split()) or type(e).__name__


def run(main: Callable[[], object]) -> None:
    """Call a script's main(): a ValueError or OSError (user errors) prints `error: ...` and exits 2; Ctrl-C 130.
    Anything else is a bug and keeps its traceback."""
    try:
        main()
    except (ValueError, OSError) as e:
        sys.stderr.write(f"error: {describe(e)}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        sys.exit(130)
