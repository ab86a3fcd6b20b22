"""Every file a run writes leaves through here: claimed before any work, written whole or not at all.

    outputs = Outputs(reads=[dataset, model_dir])    # what the run reads: never written over
    outputs.claim(args.out, "--out")                  # checked, and locked against other runs
    outputs.write_json(args.out, results)             # atomic: a unique temporary file, then a rename

A claim refuses a path the run reads, a path another output of the same run uses, a folder, a
missing or read-only directory, and a path another live run holds (a lock file `.NAME.lock` beside
it, held while the run lives). A write that fails (a full disk) says so, names the path, and leaves
the file as it was. JSON is written strictly (no NaN or inf), so a reader gets back what was written.
"""
import errno
import fcntl
import json
import os
import tempfile


class OutputError(ValueError):
    """An output cannot be claimed where asked (a bad argument); the message names it."""


def write_file(path, data):
    """Replace `path` by `data` (str or bytes) atomically, or raise OSError leaving it as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it, not mkstemp's owner-only 0600
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"{path}: the disk is full; the file was left as it was") from None
        raise OSError(e.errno, f"{path}: cannot write ({e.strerror or e}); the file was left as it was") from None


def _same(a, b):
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


class Outputs:
    def __init__(self, reads=()):
        self.reads = [r for r in reads if r]
        self.claimed = {}  # path -> what (the flag that named it)
        self.locks = []

    def claim(self, path, what):
        """Check `path` can be this run's output `what` before any work; hold its lock for the run."""
        if not path:
            return
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise OutputError(f"{what} {path!r}: no such directory {folder!r}")
        if path.endswith(os.sep) or os.path.isdir(path) or not os.access(folder, os.W_OK):
            raise OutputError(f"{what} {path!r}: cannot write a file there")
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
            raise OutputError(f"{what} {path!r}: not a regular file (a link, a pipe, a device); give a file path")
        for read in self.reads:
            inside = os.path.isdir(read) and os.path.realpath(path).startswith(os.path.realpath(read) + os.sep) \
                and os.path.exists(path)
            if _same(path, read) or inside:
                raise OutputError(f"{what} {path!r} would overwrite {read!r}, which this run reads")
        for other, name in self.claimed.items():
            if _same(path, other):
                raise OutputError(f"{what} {path!r} is also {name}: give each output its own file")
        lock = open(os.path.join(folder, "." + os.path.basename(path) + ".lock"), "a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OutputError(f"{what} {path!r} is being written by another run; wait for it or choose "
                              "another file") from None
        self.locks.append(lock)
        self.claimed[path] = what

    def release(self):
        for lock in self.locks:
            lock.close()
        self.locks = []

    def write_json(self, path, obj):
        assert path in self.claimed, f"{path} was never claimed"
        try:
            text = json.dumps(obj, indent=1, allow_nan=False)
        except ValueError as e:
            raise ValueError(f"{path}: {e} (a NaN or inf would not read back as written)") from None
        write_file(path, text + "\n")

    def write_lines(self, path, lines):
        """The whole of a JSON-lines output so far (rewritten whole: a reader never sees half a line)."""
        assert path in self.claimed, f"{path} was never claimed"
        write_file(path, "".join(json.dumps(x, allow_nan=False) + "\n" for x in lines))
