"""A data dir shared by a group: the daemon's user and the operators who run the CLI.

A setgid data dir (`chmod g+s`, as the service recipe installs `/var/lib/jobqueue`) is the sign:
everything created below it gets the dir's group from the kernel, and jobqueue makes it
group-writable too by clearing the group bits of its process umask, so that whichever of them
wrote a job folder, shard, download or the SQLite file, the other can read, extend and delete it
(a login umask of 0022 would otherwise leave the daemon unable to write into a folder `submit`
made). Others keep what the umask gave them; the setgid dir itself is what keeps them out.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def share_with_group(data_dir: Path) -> bool:
    """When `data_dir` is setgid, clear the group bits of this process's umask (0022 becomes
    0002, 0077 becomes 0007) and return True; otherwise change nothing and return False."""
    try:
        shared = bool(data_dir.stat().st_mode & stat.S_ISGID)
    except OSError:
        return False
    if shared:
        # os.umask can only be read by setting it: a stricter mask for that instant, never a
        # looser one.
        current = os.umask(0o077)
        os.umask(current & ~0o070)
    return shared


def create_with_umask(path: Path) -> None:
    """Create `path` (empty) if it does not exist, with 0666 less the umask.

    SQLite creates its database file 0644 whatever the umask, and its `-wal` and `-shm` files
    with the database file's mode; creating the file first lets the umask decide for all three.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return
    os.close(fd)
