"""Independent jobs side by side in forked workers: the graphs a calibration times, the points of a sweep.

An ONNX export is single-threaded Python for most of its time (``torch.export``, the ONNX translation, onnxslim):
on a 2-core machine a calibration's one-after-the-other exports left one core idle for a minute. ``run_jobs`` runs
a list of independent jobs (closures; each writes its own file and may return a small picklable value) in
``workers`` forked children, each taking the next job as it finishes one. The parent only hands out jobs, counts
them done (``on_done``), collects their values in job order and re-raises the first error.

Forked, not spawned: a child starts with the parent's model and imports at no cost, and a job may be any closure.
A child
- ignores SIGINT and SIGHUP: a Ctrl-C reaches the whole process group, and the parent alone decides. On any error
  or signal the parent stops its children before it goes on unwinding: SIGTERM, which a child turns into an
  exception inside its job, so that the job's own cleanup runs (a staged output folder is removed), then SIGKILL
  for a child still there after ``GRACE_S``; it reaps them all. A child dies with its parent (Linux
  ``PR_SET_PDEATHSIG``);
- freezes the objects it inherits (``gc.freeze``): no finalizer of the parent's (a temporary folder's) runs in it;
- runs torch on one thread: one worker per core;
- writes nothing to the parent's terminal (its stdout to /dev/null, its stderr to a file the parent reads when the
  child dies unexpectedly; ``sys.stdout`` and ``sys.stderr`` replaced, as a notebook's streams are sockets) and
  leaves with ``os._exit``: the parent's buffers and exit handlers stay the parent's.

Where fork is not safe (not Linux), or one worker is asked for or is all that fits, the jobs run in this process,
one after the other, with the same results. Every job must be independent of the others' side effects: a job's
changes to Python objects stay in its child.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import pickle
import selectors
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from tofu_export.profiling.device import available_memory

_FRAME = struct.Struct("<q")  # a job index (parent -> child; -1: stop) or a message length (child -> parent)
_STOP = -1
GRACE_S = 5.0  # how long a stopped child may take to clean up before it is killed
# a dynamo export's peak rise over its model's weights (bench/results/export_memory.md: 7.0 GB for 1.13 GB)
EXPORT_MEMORY_FACTOR = 6
EXPORT_MEMORY_BASE = 256 << 20  # and what a small graph's export needs besides


def can_fork() -> bool:
    """Whether ``run_jobs`` may fork here: Linux only (macOS's system libraries are not fork-safe with threads)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def weight_bytes(module: Any) -> int:
    """The bytes of a torch module's parameters and buffers (what one export of it copies)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def export_workers(jobs: int, weight_bytes: int, *, cores: int | None = None, memory: int | None = None) -> int:
    """How many workers ``jobs`` exports of a model with ``weight_bytes`` of weights should use: one per usable core
    (``cores``), no more than there are jobs, and no more than the available ``memory`` holds at
    ``EXPORT_MEMORY_FACTOR`` times the weights each (a child shares the parent's model; what it adds is its
    export's own). At least 1; 1 where ``can_fork`` is false."""
    if not can_fork():
        return 1
    cores = usable_cores() if cores is None else cores
    memory = available_memory() if memory is None else memory
    fits = cores if memory is None else memory // (EXPORT_MEMORY_FACTOR * weight_bytes + EXPORT_MEMORY_BASE)
    return max(1, min(jobs, cores, fits))


class WorkerDied(RuntimeError):
    """A worker ended without reporting its job: killed (out of memory, a signal) or crashed."""


class Stopped(BaseException):
    """Raised inside a worker's job by SIGTERM (its parent stopping it), so that the job's cleanup runs."""


def run_jobs(jobs: Sequence[Callable[[], Any]], workers: int, on_done: Callable[[], None] | None = None) -> list[Any]:
    """Run ``jobs`` in ``workers`` forked children (module docstring) and return their values in job order;
    ``on_done`` after each job, in this process. The first error a job raises is raised here (its child's
    traceback as a note), once the other workers are stopped (``_end``); so is any error or signal of this
    process's. With one worker, or where ``can_fork`` is false, the jobs run here one after the other."""
    done = on_done or (lambda: None)
    if workers <= 1 or len(jobs) <= 1 or not can_fork():
        values = []
        for job in jobs:
            values.append(job())
            done()
        return values
    for stream in (sys.stdout, sys.stderr):  # a child must not inherit half a line to print again
        with contextlib.suppress(Exception):
            stream.flush()
    pool: list[_Worker] = []
    values: list[Any] = [None] * len(jobs)
    try:
        for _ in range(min(workers, len(jobs))):
            pool.append(_Worker.start(jobs))
        pending = iter(range(len(jobs)))
        for worker in pool:
            worker.give(next(pending))
        left = len(jobs)
        with selectors.DefaultSelector() as ready:
            for worker in pool:
                ready.register(worker.results, selectors.EVENT_READ, worker)
            while left:
                for key, _ in ready.select():
                    worker = key.data
                    index, value = worker.receive()
                    values[index] = value
                    left -= 1
                    done()
                    worker.give(next(pending, _STOP))
                    if worker.job is None:
                        ready.unregister(worker.results)
    finally:
        _end(pool)
    return values


def _end(pool: Sequence[_Worker]) -> None:
    """Stop every worker still running (SIGTERM; SIGKILL after ``GRACE_S``), reap them, close their pipes. A
    second signal here cuts the grace short, never the killing."""
    try:
        for worker in pool:
            worker.stop()
        deadline = time.monotonic() + GRACE_S
        while any(worker.running() for worker in pool) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        for worker in pool:
            worker.signal(signal.SIGKILL)
            worker.close()


@dataclass
class _Worker:
    """One forked child, the two pipes to it, and the file its stderr goes to."""

    pid: int
    tasks: int  # write end: job indices
    results: int  # read end: framed pickles (index, value, error, traceback text)
    stderr: BinaryIO
    job: int | None = None

    @classmethod
    def start(cls, jobs: Sequence[Callable[[], Any]]) -> _Worker:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                os.close(task_w)
                os.close(result_r)
                _become_worker(parent, stderr.fileno())
                _serve(jobs, task_r, result_w)
                code = 0
            finally:
                os._exit(code)
        os.close(task_r)
        os.close(result_w)
        return cls(pid, task_w, result_r, stderr)

    def give(self, index: int) -> None:
        self.job = None if index == _STOP else index
        try:
            os.write(self.tasks, _FRAME.pack(index))
        except BrokenPipeError:
            if index != _STOP:
                raise self._died() from None

    def receive(self) -> tuple[int, Any]:
        """The value of the job this worker was given; its error raised."""
        head = _read_exactly(self.results, _FRAME.size)
        if len(head) < _FRAME.size:
            raise self._died()
        body = _read_exactly(self.results, _FRAME.unpack(head)[0])
        index, value, error, text = pickle.loads(body)
        if isinstance(error, Stopped):  # someone else stopped it: its job did not run to the end
            raise WorkerDied(f"an export worker was stopped by SIGTERM while running job {self.job}")
        self.job = None
        if error is not None:
            if hasattr(error, "add_note"):
                error.add_note(f"in an export worker (process {self.pid}):\n{text}")
            raise error
        return index, value

    def _died(self) -> WorkerDied:
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        how = (f"was killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status)
               else f"exited with code {os.waitstatus_to_exitcode(status)}")
        self.stderr.seek(0, os.SEEK_END)
        self.stderr.seek(max(0, self.stderr.tell() - 2000))
        tail = self.stderr.read().decode(errors="replace").strip()
        memory = " (out of memory?)" if "SIGKILL" in how else ""
        return WorkerDied(f"an export worker {how} while running job {self.job}{memory}"
                          + (f"; its last output:\n{tail}" if tail else ""))

    def stop(self) -> None:
        """No more jobs (the child waiting for one reads the end of its pipe and leaves), and SIGTERM for the
        one it runs."""
        with contextlib.suppress(OSError):
            os.close(self.tasks)
        self.tasks = -1
        self.signal(signal.SIGTERM)

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the child if it has not been reaped; after SIGKILL, reap it."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)
            if signum == signal.SIGKILL:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(self.pid, 0)
                self.pid = 0

    def running(self) -> bool:
        """Whether the child still runs (reaped here once it has ended)."""
        if self.pid:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                    return True
            self.pid = 0
        return False

    def close(self) -> None:
        for fd in (self.tasks, self.results):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.tasks = self.results = -1
        self.stderr.close()


def _become_worker(parent: int, stderr_fd: int) -> None:
    """A fresh child's set-up (module docstring)."""
    gc.freeze()
    for name in ("SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    with contextlib.suppress(Exception):  # Linux: die with the parent
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(stderr_fd, 2)
    os.close(null)
    # Python-level writes too: the inherited stream objects may be a notebook's (a socket) or a live progress bar's
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's until os._exit
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _stop(signum: int, frame: object) -> None:
    raise Stopped


def _serve(jobs: Sequence[Callable[[], Any]], tasks: int, results: int) -> None:
    """Run the jobs the parent names until it says stop (or goes away)."""
    while True:
        head = _read_exactly(tasks, _FRAME.size)
        if len(head) < _FRAME.size or (index := _FRAME.unpack(head)[0]) == _STOP:
            return
        value = error = None
        text = ""
        try:
            value = jobs[index]()
        except BaseException as exc:  # every error goes to the parent, which decides
            error, text = exc, traceback.format_exc()
        _write_all(results, _message(index, value, error, text))
        if isinstance(error, Stopped):
            return


def _message(index: int, value: Any, error: BaseException | None, text: str) -> bytes:
    """A framed pickle of a job's outcome; an error (or value) that does not survive pickling is sent as a
    ``RuntimeError`` naming it."""
    try:
        body = pickle.dumps((index, value, error, text))
        pickle.loads(body)  # an exception whose constructor needs more than its args pickles but does not load
    except Exception as exc:
        what = error if error is not None else exc
        body = pickle.dumps((index, None, RuntimeError(f"{type(what).__name__}: {what}"), text))
    return _FRAME.pack(len(body)) + body


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd: int, count: int) -> bytes:
    """``count`` bytes from ``fd``, or fewer where it ends first."""
    chunks, left = [], count
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
