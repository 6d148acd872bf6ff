"""Signals at any moment end the command with one line and no traceback; killed runs leave nothing the next run
cannot prove stale and remove; a held lock is waited on for a bounded time, names its holder, and Ctrl-C works.

The command runs as ``python -m tofu_export.cli`` (the console script's code path). "Our first line has run" is
read from ``/proc/PID/status``: once ``tofu_export.cli`` installed its handlers, SIGTERM is a caught signal.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import from_a_terminal

from tofu_export.artifacts import staged_folder
from tofu_export.atomic import LockBusyError, locked_folder, owner_is_dead, owner_tag, write_text_atomic

CLI = (sys.executable, "-m", "tofu_export.cli")
COMMAND = (*CLI, "schedule", "deit_tiny_patch16_224", "--r", "2")  # imports torch and timm: a few seconds
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def _caught(pid: int) -> int:
    """The process's caught-signal mask (``SigCgt``), 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("SigCgt")), 16)


def _wait_for_handlers(process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not _caught(process.pid) & (1 << (signal.SIGTERM - 1)):
        assert process.poll() is None and time.monotonic() < deadline, "the command never installed its handlers"
        time.sleep(0.002)


def _env() -> dict[str, str]:
    return {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(("delay", "signum", "twice"), [
    (0.0, signal.SIGINT, False),  # while torch is imported
    (0.0, signal.SIGINT, True),  # and a second Ctrl-C right after the first
    (0.5, signal.SIGTERM, False),
    (1.5, signal.SIGHUP, True),
    (3.0, signal.SIGINT, True),  # inside the command (or after it finished)
])
def test_a_signal_at_any_moment_ends_without_a_traceback(tmp_path: Path, delay: float, signum: int,
                                                         twice: bool) -> None:
    process = subprocess.Popen(COMMAND, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=from_a_terminal)
    _wait_for_handlers(process)
    time.sleep(delay)
    process.send_signal(signum)
    if twice:
        time.sleep(0.01)
        if process.poll() is None:
            process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert process.returncode in (0, 128 + signum), (process.returncode, stderr)
    if process.returncode:
        assert stderr.strip().splitlines()[-1].startswith("error: "), stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ignored", [(signal.SIGHUP,), (signal.SIGHUP, signal.SIGINT)], ids=["nohup", "nohup-bg"])
def test_under_nohup_sighup_stays_ignored_and_sigterm_ends_the_command_quietly(tmp_path: Path,
                                                                              ignored: tuple[int, ...]) -> None:
    """``nohup COMMAND`` starts it with SIGHUP ignored, ``nohup COMMAND &`` from a script with SIGINT too: those stay
    ignored, and SIGTERM, ``kill``'s default, still ends it quietly. It used to catch SIGHUP all the same (a closing
    terminal stopped a ``nohup``'d export, exit 129), and with SIGINT ignored it installed no handler until the
    command had ended (a SIGTERM killed it on the spot, leaving an export's staging folder)."""

    def start_ignoring() -> None:
        for signum in ignored:
            signal.signal(signum, signal.SIG_IGN)

    process = subprocess.Popen(COMMAND, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=start_ignoring)
    _wait_for_handlers(process)
    assert not _caught(process.pid) & sum(1 << (signum - 1) for signum in ignored)  # still ignored
    process.send_signal(signal.SIGHUP)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, (process.returncode, stderr)
    assert stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM", stderr
    assert list(tmp_path.iterdir()) == []


def test_owner_tags_prove_a_process_dead_only_when_it_is() -> None:
    mine = owner_tag()
    host, pid, start = mine.split("-")
    assert int(pid) == os.getpid()
    assert not owner_is_dead(f"{mine}-x")  # this process is alive
    assert owner_is_dead(f"{host}-{pid}-{int(start) + 1}-x")  # same pid, another start: the pid was reused
    assert owner_is_dead(f"{host}-999999999-1-x")  # no such process
    assert not owner_is_dead("00000000-999999999-1-x")  # another host: cannot be proved, left alone
    assert not owner_is_dead("abc")  # not a tag: never touched


KILLED_EXPORT = r"""
import sys, time
from pathlib import Path
from tofu_export.artifacts import staged_folder
from tofu_export.atomic import write_text_atomic
with staged_folder(Path(sys.argv[1])) as staging:
    (staging / "model.onnx").write_bytes(b"half")
    print(staging, flush=True)
    time.sleep(120)
"""


def test_sigkill_leaves_a_staging_folder_the_next_run_removes_and_names(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", KILLED_EXPORT, str(out)], stdout=subprocess.PIPE, text=True,
                             env=_env(), preexec_fn=from_a_terminal)
    assert child.stdout is not None
    staging = Path(child.stdout.readline().strip())
    child.kill()
    child.wait()
    assert staging.is_dir() and staging.parent == tmp_path
    (tmp_path / ".out.partial-not-a-tag").mkdir()  # not ours to judge: left alone
    with caplog.at_level(logging.WARNING), staged_folder(out) as fresh:
        write_text_atomic(fresh / "manifest.json", '{"tool": "tofu-export"}')
    assert not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.partial-not-a-tag", "out"]
    assert str(staging) in caplog.text and "killed" in caplog.text


def test_a_killed_atomic_write_leaves_a_temp_file_the_next_write_removes(tmp_path: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; from tofu_export.atomic import owner_tag; "
                            f"open({str(tmp_path)!r} + '/.policy.json.' + owner_tag() + '-abc.tmp', 'w')"],
                           env=_env(), check=True)
    assert child.returncode == 0 and len(list(tmp_path.iterdir())) == 1  # its process is gone now
    write_text_atomic(tmp_path / "policy.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["policy.json"]


HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_a_held_lock_is_waited_on_for_a_bounded_time_and_names_its_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(LockBusyError, match=f"pid {holder.pid}"), locked_folder(tmp_path, wait_s=0.3):
            pass
        assert time.monotonic() - start < 5
        waiter = subprocess.Popen([sys.executable, "-c", "import sys; from tofu_export.atomic import locked_folder\n"
                                   "print('waiting', flush=True)\nwith locked_folder(sys.argv[1], wait_s=100): pass",
                                   str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=from_a_terminal)
        assert waiter.stdout is not None and waiter.stdout.readline().strip() == "waiting"
        time.sleep(0.3)
        waiter.send_signal(signal.SIGINT)  # Ctrl-C while waiting for the lock
        _, stderr = waiter.communicate(timeout=10)
        assert waiter.returncode != 0 and "KeyboardInterrupt" in stderr
    finally:
        holder.kill()
        holder.wait()


_IMPORT_SIGNALS_ITSELF = """
import os, signal, time
os.kill(os.getpid(), signal.{name})
{second}
time.sleep(0.3)  # the signal is pending here, inside the import
done = True
"""

_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tofu_export.cli.signals import raise_on_signals
raise_on_signals()
try:
    import signals_itself
except KeyboardInterrupt:
    print("raised inside the import")
    sys.exit(1)
try:
    time.sleep(10)
except KeyboardInterrupt as interrupt:
    print("raised after the import:", type(interrupt).__name__, signals_itself.done)
    sys.exit(0)
print("never raised")
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_during_an_import_is_raised_when_the_import_ends(tmp_path: Path, name: str) -> None:
    """Raising inside an import leaves extension modules half made (torch turned it into a warning and a later
    ``import numpy`` failed: exit 4 in CI), so the signal waits for the import, then raises as usual."""
    (tmp_path / "signals_itself.py").write_text(_IMPORT_SIGNALS_ITSELF.format(name=name, second=""))
    result = subprocess.run((sys.executable, "-c", _RUN, str(tmp_path)), capture_output=True, text=True,
                            timeout=120, env=_env(), preexec_fn=from_a_terminal)
    kind = "KeyboardInterrupt" if name == "SIGINT" else "Terminated"
    assert (result.returncode, result.stdout.strip()) == (0, f"raised after the import: {kind} True"), result


def test_a_second_signal_while_the_first_waits_for_an_import_exits_at_once(tmp_path: Path) -> None:
    second = "time.sleep(0.05); os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)"
    (tmp_path / "signals_itself.py").write_text(_IMPORT_SIGNALS_ITSELF.format(name="SIGTERM", second=second))
    result = subprocess.run((sys.executable, "-c", _RUN, str(tmp_path)), capture_output=True, text=True,
                            timeout=120, env=_env(), preexec_fn=from_a_terminal)
    assert result.returncode == 128 + signal.SIGTERM, result
    assert (result.stdout, result.stderr.strip()) == ("", "error: stopped by SIGTERM"), result
