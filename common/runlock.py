"""One run per output directory: an exclusive lock file that dies with its holder.

`RunDirLock(dir).acquire()` takes an `fcntl.flock` on `dir/.proteus.lock` and writes the holder's PID,
host and start time into it. A second run on the same directory fails at once with a UserError naming
that holder. The kernel drops the lock when the holder exits in any way (kill -9 included), so a stale
lock never blocks. On a filesystem without flock support (some NFS mounts) the file itself is the lock:
a holder on this host that is no longer alive is taken over; one on another host must be removed by
hand, as the message says.
"""
import errno
import fcntl
import json
import os
import socket
import sys
import time

from models.errors import UserError

LOCK_NAME = ".proteus.lock"


class RunDirBusy(UserError):
    """Another live process holds the output directory."""


class RunDirLock:
    def __init__(self, directory: str, what: str = "output dir"):
        self.directory, self.what = directory, what
        self.path = os.path.join(directory, LOCK_NAME)
        self._fd = None

    def acquire(self) -> "RunDirLock":
        try:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{self.what} {self.directory} is not writable ({e.strerror}); choose another "
                            f"--output-dir or fix its permissions") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirBusy(self._busy_message(holder)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._fallback_check(fd)  # no flock on this filesystem: the file's content is the lock
        self._fd = fd
        _write_holder(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # kept, not unlinked: unlinking races with a second opener
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    def _busy_message(self, holder: dict) -> str:
        who = (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} (started "
               f"{holder.get('started', '?')}: {holder.get('argv', '')})") if holder else "another process"
        return (f"{self.what} {self.directory} is in use by {who}. Two runs in one directory would mix their "
                f"checkpoints and logs: wait for it to finish, stop it, or use another --output-dir")

    def _fallback_check(self, fd: int) -> None:
        holder = _read_holder(fd)
        if not holder or holder.get("released"):
            return
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0))):
            return  # stale: its holder on this host is gone
        os.close(fd)
        raise RunDirBusy(self._busy_message(holder) + f" (if it is not running any more, delete {self.path})")


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {}


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
