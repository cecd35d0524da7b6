"""What keeps a job's output safe: where it may go, one run at a time on it, resume only onto the output of the same
job, error lines retried on request, and a graceful stop on SIGTERM / SIGINT.

    check_output_path(in, out)   refuse an output that is the input, a pipe, a terminal or a device ("-" streams)
    OutputLock(out)              an exclusive lock beside the output (OUT.lock, holding the pid); a second run fails
    Manifest                     what produced OUT (input hash, model, options that change results), in
                                 OUT.manifest.json; a rerun that differs is refused unless --force
    drop_error_lines(out)        --retry-failed: OUT rewritten without its error lines (atomic rename)
    graceful_stop()              SIGTERM / SIGINT raise JobStopped in the main thread: the job stops admitting work,
                                 the writer flushes and fsyncs what is finished, the command exits 128 + signal
    spool_stdin(dir)             `-i -`: standard input copied to a file (two passes read the input)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from batchllm.jobs.scan import JobError

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

STREAM = "-"
MANIFEST_VERSION = 1


class JobStopped(Exception):
    """SIGTERM or SIGINT arrived; finished results are flushed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def check_output_path(input_path: str, output_path: str) -> None:
    """Raises JobError when OUT cannot be a resumable result file: the input itself, a pipe, a terminal, a device or
    a folder. `-` (stream to standard output) is the explicit way to write to a pipe."""
    if output_path == STREAM:
        return
    out = Path(output_path)
    if input_path != STREAM and out.exists() and Path(input_path).exists() and os.path.samefile(input_path, out):
        raise JobError(f"the output file {output_path} is the input file; choose another -o")
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise JobError(f"cannot use output {output_path}: {e.strerror}") from None
    if stat.S_ISDIR(mode):
        raise JobError(f"the output {output_path} is a folder; -o takes a file")
    if not stat.S_ISREG(mode):
        kind = "a pipe" if stat.S_ISFIFO(mode) else "a terminal or device" if stat.S_ISCHR(mode) else "not a file"
        raise JobError(f"the output {output_path} is {kind}: a resumable output must be a regular file (use -o - to "
                       "stream results to standard output, without resume)")


class OutputLock:
    """An exclusive, non-blocking lock on OUT.lock, held for the whole job, holding the pid of its run. The lock dies
    with the process (flock), so a killed run never leaves OUT locked."""

    def __init__(self, output_path: str):
        self.path = Path(output_path + ".lock")
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        if fcntl is None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise JobError(f"{self.path.with_suffix('')} is being written by another batchllm run (pid {holder}); "
                               "wait for it to finish, or choose another -o") from None
            try:  # the holder we waited on may have removed the file meanwhile: lock the file that is there now
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class Manifest:
    """What a job's results depend on. Two runs with equal manifests may share an output (resume)."""

    input_sha256: str
    model: str
    options: dict  # the engine and job options that change results (dtype, seed, max_model_len, ...)
    version: int = MANIFEST_VERSION

    @staticmethod
    def path_of(output_path: str) -> Path:
        return Path(output_path + ".manifest.json")

    @classmethod
    def read(cls, output_path: str) -> Manifest | None:
        try:
            data = json.loads(cls.path_of(output_path).read_text(encoding="utf-8"))
            return cls(data["input_sha256"], data["model"], dict(data["options"]), int(data.get("version", 0)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"cannot read {cls.path_of(output_path)}: {e}") from None

    def write(self, output_path: str) -> None:
        """Atomically (temp file, fsync, rename)."""
        path = self.path_of(output_path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def differences(self, other: Manifest) -> list[str]:
        """What differs from `other` (the manifest of the existing output), in words."""
        out = []
        if self.input_sha256 != other.input_sha256:
            out.append("the input file's contents differ (another file, or it was edited)")
        if self.model != other.model:
            out.append(f"model {self.model!r} (the output's: {other.model!r})")
        for key in sorted(set(self.options) | set(other.options)):
            if self.options.get(key) != other.options.get(key):
                out.append(f"{key} {self.options.get(key)!r} (the output's: {other.options.get(key)!r})")
        return out


def check_resume(output_path: str, manifest: Manifest, force: bool) -> None:
    """Before anything touches OUT: an existing, non-empty OUT must come from this same job (equal manifest).
    Refused with the differences, unless `force`. Then writes this job's manifest."""
    if output_path == STREAM:
        return
    out = Path(output_path)
    has_results = out.is_file() and out.stat().st_size > 0
    old = Manifest.read(output_path)
    if has_results and not force:
        if old is None:
            raise JobError(f"{output_path} already exists and was not written by `batchllm run` (no "
                           f"{Manifest.path_of(output_path).name} beside it), so resuming onto it could keep "
                           "foreign results; choose another -o, or pass --force to resume onto it")
        diff = manifest.differences(old)
        if diff:
            raise JobError(f"{output_path} holds the results of another job: " + "; ".join(diff)
                           + ". Choose another -o, or pass --force to resume onto it anyway")
    if has_results and force and old != manifest:
        print(f"batchllm run: --force: resuming onto {output_path} whatever produced it", file=sys.stderr)
    manifest.write(output_path)


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def drop_error_lines(output_path: str) -> int:
    """--retry-failed: rewrites OUT without its error lines (a torn last line goes too), atomically; returns how
    many were dropped. Their requests then run again."""
    path = Path(output_path)
    if not path.is_file():
        return 0
    dropped = 0
    tmp = path.with_name(path.name + ".retry.tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        for raw in src:
            try:
                record = json.loads(raw) if raw.endswith(b"\n") else None
            except (ValueError, UnicodeDecodeError):
                record = None
            if isinstance(record, dict) and record.get("error") is None:
                dst.write(raw)
            else:
                dropped += 1
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, path)
    return dropped


@contextlib.contextmanager
def graceful_stop() -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGINT raises JobStopped in the main thread (later ones are ignored
    while the job flushes). Outside the main thread nothing changes."""
    try:
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:
        yield
        return
    stopping = []

    def handler(signum, frame):
        if stopping:
            return
        stopping.append(signum)
        raise JobStopped(signum)

    try:
        for s in previous:
            signal.signal(s, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def spool_stdin(folder: Path) -> str:
    """`-i -`: copies standard input to a file in `folder` (removed by the caller); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".batchllm-stdin-", suffix=".jsonl", dir=folder)
    with os.fdopen(fd, "wb") as f:
        while chunk := sys.stdin.buffer.read(1 << 20):
            f.write(chunk)
    return name
