"""Writes that never leave a half-written file or folder behind (write aside, then rename), and
the lock that keeps two processes out of one run folder."""
import contextlib
import fcntl
import os
import shutil
import tempfile


def atomic_write_text(path, text):
    """Write text to path through a temporary file in the same folder and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the serving container may run as another user
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def replace_dir(new_dir, dest):
    """Give the complete folder new_dir the name dest, replacing what was there (it goes only after)."""
    if os.path.exists(dest):
        old = f"{dest}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
        os.rename(new_dir, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new_dir, dest)


def partial_dir(parent, name):
    """A fresh hidden work folder beside parent/name, e.g. checkpoint/.run1.partial-1234.

    Work folders left by killed processes (their pid is gone) are removed first.
    """
    os.makedirs(parent, exist_ok=True)
    stem = f".{name}.partial-"
    for entry in os.listdir(parent):
        if entry.startswith(stem) and not pid_alive(entry[len(stem):]):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    path = os.path.join(parent, stem + str(os.getpid()))
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.chmod(path, 0o755)
    return path


def pid_alive(text):
    try:
        os.kill(int(text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(parent, name):
    """Hold parent/.name.lock for the life of the block; refuse (UsageError) when another process
    holds it. The file goes away on release; a lock left by a killed process is free again at once
    (the kernel drops flock locks with their process)."""
    from finetune import UsageError

    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(f"another process (pid {holder}) is using {os.path.join(parent, name)}: "
                             "wait for it to finish or stop it") from None
        try:  # the holder may have removed the file just before we locked it: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.unlink(path)
        os.close(fd)
