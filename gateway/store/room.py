"""Room on the outbox's disk: how large its WAL may grow, and a reserve file that keeps room for the way out.

A full disk wedged the outbox for good: the WAL cannot be moved into a database file that cannot grow, and no
transaction (not even one that only deletes acknowledged rows) can extend the WAL. The outbox keeps a reserve
file beside its database, made while the disk has room. On a write that fails for a full disk it deletes the
reserve: the deletes of acknowledged rows then fit into the WAL, and a checkpoint moves them into the pages
they freed, which the next messages reuse. The reserve is made again once
the disk has room for it twice over, so that making it never fills the disk itself.

The WAL is checkpointed at 1 MiB, or at a sixteenth of the partition where that is less: on a 600 KiB disk the WAL
filled it after 29 messages, before its first checkpoint.
"""

from __future__ import annotations

import os

WAL_LIMIT = 1 << 20  # bytes: where the WAL is checkpointed on a partition of 16 MiB or more
PAGE = 4096


def wal_limit(path: str) -> int:
    """The bytes the WAL of the database at `path` may hold before a checkpoint: WAL_LIMIT, or a sixteenth of the
    partition, at least 8 pages."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return WAL_LIMIT
    return max(8 * PAGE, min(WAL_LIMIT, st.f_blocks * st.f_frsize // 16 // PAGE * PAGE))


def free_bytes(path: str) -> int | None:
    """Bytes free for an unprivileged writer on the partition of `path` (None: it cannot be told)."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Reserve:
    """A file of `size` bytes at `path`, made while the disk has room for it twice over, deleted when the room is
    needed."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size

    @property
    def held(self) -> bool:
        return os.path.exists(self.path)

    def keep(self) -> bool:
        """Make the reserve if it is missing and the disk has room for it twice over; whether it is there now."""
        if self.held:
            return True
        free = free_bytes(self.path)
        if free is None or free < 2 * self.size:
            return False
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return False
        try:
            # Written, not sparse: a sparse file (or ftruncate) takes no blocks, and deleting it would free nothing.
            block = b"\0" * 65536
            for at in range(0, self.size, len(block)):
                os.write(fd, block[:self.size - at])
        except OSError:  # the disk filled meanwhile: a reserve that is not whole is no reserve
            os.close(fd)
            self.release()
            return False
        os.close(fd)
        return True

    def release(self) -> bool:
        """Delete the reserve; whether there was one."""
        try:
            os.remove(self.path)
        except OSError:
            return False
        return True
