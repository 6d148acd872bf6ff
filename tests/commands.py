"""Running commands from tests so that a busy machine slows them down but never fails them.

Two limits replace a fixed wall-clock timeout (which a loaded CI machine hits while nothing is wrong):

- CPU seconds (``RLIMIT_CPU``): a command that computes far longer than it should is killed (``SIGXCPU``) however
  busy the machine is, since other processes do not add to its CPU time;
- a hang guard on a load-adjusted clock (``LoadClock``): each wall-clock second counts as ``cores / load`` seconds
  when the load average exceeds the core count, so a command that waits on nothing is still stopped, and a command
  that waits for a share of a crowded CPU is not.

``ForkServer`` runs ``tofu-export ARGS`` in children forked from one interpreter that imported the package, torch
and the exporters once: a fresh interpreter spends ~8 CPU-seconds on imports, more than a tiny export takes. A
child sets argv, working folder, environment and standard streams as a shell would and calls the console script's
``main()``; the server was started with the same environment, so libraries that read it at import (OpenMP's
thread count, rich's colour) see what a fresh ``tofu-export`` would. With ``TOFU_TESTS_TRACE_CACHE`` naming a
folder (the suite's conftest makes one; ``off`` turns it off), the children share one dynamo trace per distinct
model (``trace_cache``).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_LIMIT_S = 300  # CPU seconds one command may use (a tiny export uses ~10)
QUIET_LIMIT_S = 600  # seconds on a load-adjusted clock before a command counts as hung
CPU_LOG = "TOFU_TESTS_CPU_LOG"  # set to a file path: every forked command's CPU seconds are appended to it


class LoadClock:
    """Seconds that would have passed on an idle machine: wall time scaled by ``min(1, cores / load)``."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.spent = 0.0
        self.wall = 0.0

    def tick(self, wall_s: float) -> None:
        load = os.getloadavg()[0]
        self.wall += wall_s
        self.spent += wall_s * min(1.0, self.cores / max(load, 1e-9))

    def __str__(self) -> str:
        return f"{self.wall:.0f} s wall, {self.spent:.0f} s on the load-adjusted clock"


def _limit_cpu(seconds: int) -> None:
    """In the child: ``SIGXCPU`` after ``seconds`` of CPU time, ``SIGKILL`` a few seconds later."""
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 5))


def explain(code: int, cpu_s: int) -> str:
    """What the exit code of a killed command means, or ''."""
    if code in (-signal.SIGXCPU, -signal.SIGKILL):
        return f"\n[killed: it used its {cpu_s} CPU-seconds]"
    return ""


@dataclass(frozen=True)
class Finished:
    """A finished command: its exit code, both streams, and the CPU seconds it used (None: not measured)."""

    returncode: int
    stdout: str
    stderr: str
    cpu_s: float | None = None


def from_a_terminal() -> None:
    """In a child (``preexec_fn``): the signal dispositions a command typed at a terminal starts with, whatever the
    test run inherited (a run started in the background ignores SIGINT, under ``nohup`` SIGHUP too, and every child
    inherits that: a test that sends them would see them ignored)."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def run_guarded(args: Sequence[str | Path], cwd: Path, env: Mapping[str, str], cpu_s: int = CPU_LIMIT_S,
                quiet_s: float = QUIET_LIMIT_S, preexec: Callable[[], None] | None = None) -> Finished:
    """Run ``args`` with a CPU-time limit and the hang guard; streams go through files, so a chatty command never
    blocks on a full pipe. ``preexec`` runs in the child too (more limits)."""

    def limits() -> None:
        _limit_cpu(cpu_s)
        if preexec is not None:
            preexec()

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen([str(arg) for arg in args], cwd=cwd, env=dict(env), stdout=out, stderr=err,
                                   preexec_fn=limits)
        clock = LoadClock()
        while True:
            start = time.monotonic()
            try:
                code = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                clock.tick(time.monotonic() - start)
                if clock.spent > quiet_s:
                    process.kill()
                    process.wait()
                    raise TimeoutError(f"{args!r} hung: {clock}") from None
        out.seek(0)
        err.seek(0)
        return Finished(code, out.read().decode(), err.read().decode() + explain(code, cpu_s))


_IN_ONE_INTERPRETER = r"""
import contextlib, io, json, sys
from tofu_export.cli import main
for args, torch_installed in json.loads(sys.argv[1]):
    if not torch_installed:
        sys.modules["torch"] = None  # what a machine without torch answers: import fails, find_spec is None
    sys.argv, out, err = ["tofu-export", *args], io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main()
            code = 0
        except SystemExit as done:
            code = done.code
    print(json.dumps([code, out.getvalue(), err.getvalue(), sys.modules.get("torch") is not None]), flush=True)
"""


@dataclass(frozen=True)
class InProcess:
    """One command of ``run_in_one_interpreter``: exit code, both streams, whether torch had been imported by then."""

    code: int
    stdout: str
    stderr: str
    torch_loaded: bool


def run_in_one_interpreter(commands: Sequence[tuple[Sequence[str], bool]], cwd: Path,
                           env: Mapping[str, str]) -> list[InProcess]:
    """``tofu-export ARGS`` for each ``(ARGS, torch_installed)`` in turn, by ``main()`` in one fresh interpreter
    (``run_guarded``); from the first command with ``torch_installed`` False on, torch cannot be imported, as on a
    machine without it."""
    done = run_guarded([sys.executable, "-c", _IN_ONE_INTERPRETER, json.dumps([[list(a), t] for a, t in commands])],
                       cwd, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [InProcess(*json.loads(line)) for line in done.stdout.splitlines()]


SERVER = r"""
import json, os, resource, signal, sys
from tofu_export.cli import main
import pkgutil
import tofu_export
PRELOAD = ("timm", "onnxscript", "torch.onnx._internal.exporter._core", "onnxsim", "onnxslim", "matplotlib.figure",
           "matplotlib.backends.backend_agg", "torch.export._trace", "sympy.combinatorics", "rich._emoji_codes",
           "typer._adapters")  # the last four: what torch.export, sympy, rich and typer import on first use
for info in pkgutil.walk_packages(tofu_export.__path__, "tofu_export."):  # every module a command may import lazily
    if not info.name.endswith("__main__"):
        PRELOAD += (info.name,)
for name in PRELOAD:  # imported once here, so no child pays for it; an optional extra that is missing is skipped
    try:
        __import__(name)
    except Exception:
        pass
try:  # torch's ONNX function registry with the default translations, built once here for every child's exports
    from tofu_export.exporters import dynamo
    dynamo._registry(tuple(dynamo.translation_table(17).items()))
except Exception:
    pass
if os.environ.get("TOFU_TESTS_TRACE_CACHE", "off") != "off":  # one dynamo trace per distinct model (trace_cache.py)
    sys.path.insert(0, sys.argv[1])
    import trace_cache
    trace_cache.install(trace_cache.Path(os.environ["TOFU_TESTS_TRACE_CACHE"]))
if os.environ.get("TOFU_TESTS_GC") != "default":  # as conftest.lean_garbage_collector: the children inherit it
    import gc
    from tofu_export.cli import fewer_collections
    gc.freeze()
    fewer_collections()

def vm_bytes():
    line = next(l for l in open("/proc/self/status").read().splitlines() if l.startswith("VmSize"))
    return int(line.split()[1]) * 1024

def child(request):
    if request.get("memory_bytes"):  # address space over the server's: a regression fails instead of swapping
        limit = vm_bytes() + request["memory_bytes"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if request.get("fsize_bytes"):  # a full disk: a write past the limit fails with EFBIG (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize_bytes"], request["fsize_bytes"]))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    resource.setrlimit(resource.RLIMIT_CPU, (request["cpu_s"], request["cpu_s"] + 5))
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        os.dup2(os.open(path, flags, 0o644), fd)
    sys.argv = ["tofu-export", *request["args"]]
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:  # one batch of requests per line; one line of [exit code, CPU seconds] per batch
    batch = json.loads(line)
    requests, running, codes = list(batch["requests"]), {}, {}
    while requests or running:
        while requests and len(running) < batch["parallel"]:
            request = requests.pop(0)
            pid = os.fork()
            if pid == 0:
                child(request)
            running[pid] = request["id"]
        pid, status, usage = os.wait4(-1, 0)
        codes[running.pop(pid)] = [os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime]
    print(json.dumps(codes), flush=True)
"""


class ForkServer:
    """``tofu-export ARGS`` in children of one pre-imported interpreter (see the module docstring)."""

    def __init__(self, env: Mapping[str, str], scratch: Path) -> None:
        self.env, self.scratch = dict(env), scratch
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(Path(__file__).parent)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, text=True,
                                        start_new_session=True)
        self.batches = 0

    def run_all(self, commands: Mapping[str, tuple[Sequence[str | Path], Path]], parallel: int = 2,
                cpu_s: int = CPU_LIMIT_S, quiet_s: float = QUIET_LIMIT_S,
                memory_bytes: int | None = None, fsize_bytes: Mapping[str, int] | None = None) -> dict[str, Finished]:
        """Run every ``name: (args, cwd)``, ``parallel`` at a time, in the order given (the first ``parallel``
        start together); results keyed like ``commands``. The hang guard allows ``quiet_s`` load-adjusted seconds
        per command, spread over the batch; ``memory_bytes`` caps the address space each command may add to the
        server's (``RLIMIT_AS``); ``fsize_bytes`` gives named commands a largest file they may write
        (``RLIMIT_FSIZE``: a full disk)."""
        self.batches += 1
        folder = self.scratch / f"batch-{self.batches}"
        folder.mkdir(parents=True)
        requests = [{"id": name, "args": [str(arg) for arg in args], "cwd": str(cwd), "env": self.env,
                     "cpu_s": cpu_s, "memory_bytes": memory_bytes, "fsize_bytes": (fsize_bytes or {}).get(name),
                     "stdout": str(folder / f"{name}.out"), "stderr": str(folder / f"{name}.err")}
                    for name, (args, cwd) in commands.items()]
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"requests": requests, "parallel": parallel}) + "\n")
        self.process.stdin.flush()
        reply: list[str] = []
        reader = threading.Thread(target=lambda: reply.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        clock, allowance = LoadClock(), quiet_s * max(1.0, len(commands) / parallel)
        while reader.is_alive():
            start = time.monotonic()
            reader.join(timeout=1.0)
            clock.tick(time.monotonic() - start)
            if reader.is_alive() and clock.spent > allowance:
                self.close()
                raise TimeoutError(f"tofu-export commands {sorted(commands)} hung: {clock}")
        if not reply or not reply[0]:
            raise RuntimeError(f"the fork server died (exit {self.process.poll()})")
        codes = json.loads(reply[0])
        if os.environ.get(CPU_LOG):  # where the suite's time goes: one "name<TAB>exit code<TAB>CPU seconds" line each
            with open(os.environ[CPU_LOG], "a", encoding="utf-8") as log:
                log.writelines(f"{name}\t{code}\t{cpu:.2f}\n" for name, (code, cpu) in codes.items())
        return {name: Finished(codes[name][0], (folder / f"{name}.out").read_text(),
                               (folder / f"{name}.err").read_text() + explain(codes[name][0], cpu_s), codes[name][1])
                for name in commands}

    def close(self) -> None:
        """Stop the server: it ends at the end of its input; if it does not, it and its children are killed."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
