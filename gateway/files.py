"""Writing a file a user names (an export, a users file, a generated password): whole or not at all, and never
in place of something that is not a file."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

STDOUT = ("-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")


@contextlib.contextmanager
def replacing(path: str | Path, mode: int | None = None, owner: tuple[int, int] | None = None,
              errors: str = "strict") -> Iterator[IO[str]]:
    """A text stream for `path`.

    A file is written beside it, with `mode` (else as the umask says; and `owner`, as root) before a byte is in
    it, and renamed over it once all is written and synced; through a symlink, over the file it names (the link
    stays). On any error the half-written one is removed and the old file stays. `errors="surrogateescape"` writes
    back bytes that were read the same way (a line in another encoding, kept as it was).

    Anything else is written to as it is, its mode left alone: standard output (`-`, /dev/stdout: through the
    process's own stream, so that a redirect to a file is not overwritten by a second open of it), and whatever
    exists under /dev or /proc or is not a regular file (a named pipe, a device). Renaming over those would
    replace the node itself: as root, even /dev/full.
    """
    if str(path) in STDOUT:
        sys.stdout.flush()
        yield sys.stdout
        sys.stdout.flush()
        return
    target = Path(path)
    if (target.exists() and not target.is_file()) or target.absolute().parts[1:2] in (("dev",), ("proc",)):
        with open(target, "w", newline="", encoding="utf-8", errors=errors) as out:
            yield out
        return
    target = target.resolve()
    tmp = target.with_name(f"{target.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # whatever the umask
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        with open(fd, "w", newline="", encoding="utf-8", errors=errors) as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def not_text(name: str) -> str | None:
    """Why the file `name` is not UTF-8 text (a secret or a users file saved in another encoding), or None."""
    try:
        with open(name, "rb") as fh:
            data = fh.read()
        data.decode("utf-8")
    except OSError:
        return None  # it was readable a moment ago: the reader will say what it finds
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        return f'expected UTF-8 text in "{name}", got byte 0x{data[err.start]:02x} on line {line}; save it as UTF-8'
    return None
