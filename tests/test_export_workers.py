"""``exporters.workers``: independent jobs in forked workers, their values back in order, every way a job can fail
reported in the caller, and no child process left behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tofu_export.errors import Hint, UserError
from tofu_export.exporters import workers as workers_module
from tofu_export.exporters.workers import (
    EXPORT_MEMORY_BASE,
    EXPORT_MEMORY_FACTOR,
    WorkerDied,
    can_fork,
    export_workers,
    run_jobs,
)

pytestmark = pytest.mark.skipif(not can_fork(), reason="forked workers run on Linux only; elsewhere jobs run in turn")


def _no_children_left() -> bool:
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def _pid(i: int) -> tuple[int, int]:
    return i, os.getpid()


def test_values_come_back_in_job_order_from_forked_workers() -> None:
    done = []
    values = run_jobs([lambda i=i: _pid(i) for i in range(7)], 2, on_done=lambda: done.append(os.getpid()))
    assert [i for i, _ in values] == list(range(7))
    pids = {pid for _, pid in values}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers did them all, the caller none
    assert done == [os.getpid()] * 7  # counted here, once a job
    assert _no_children_left()


def test_one_worker_runs_the_jobs_here_in_turn() -> None:
    values = run_jobs([lambda i=i: _pid(i) for i in range(3)], 1)
    assert values == [(0, os.getpid()), (1, os.getpid()), (2, os.getpid())]


def test_a_job_that_writes_a_file_leaves_it_for_the_caller(tmp_path) -> None:
    paths = [tmp_path / f"{i}.txt" for i in range(4)]
    assert run_jobs([lambda p=p: p.write_text(p.stem) for p in paths], 2) == [1] * 4
    assert [p.read_text() for p in paths] == ["0", "1", "2", "3"]


def test_a_jobs_error_is_raised_here_as_it_was_with_its_traceback_as_a_note() -> None:
    def refuse() -> None:
        raise UserError("r is too large", hint=Hint("r", "8"))

    with pytest.raises(UserError, match="r is too large") as caught:
        run_jobs([lambda: 1, refuse, lambda: 2], 2)
    assert caught.value.hint == Hint("r", "8")  # the hint survives the trip
    if hasattr(caught.value, "__notes__"):  # Python 3.11+
        assert "in refuse" in caught.value.__notes__[0] and "export worker" in caught.value.__notes__[0]
    assert _no_children_left()


def test_an_error_that_cannot_be_sent_back_is_named() -> None:
    class Odd(Exception):
        def __init__(self, a: str, b: int) -> None:  # unpicklable from its args alone
            super().__init__(a)
            self.b = b

    def odd() -> None:
        raise Odd("an odd failure", 2)

    with pytest.raises(RuntimeError, match="Odd: an odd failure"):
        run_jobs([odd, odd], 2)
    assert _no_children_left()


def test_a_worker_that_dies_is_reported_with_what_it_last_wrote() -> None:
    def crash() -> None:
        os.write(2, b"native library: cannot continue\n")
        os._exit(3)

    said = r"(?s)exited with code 3 while running job 1.*native library: cannot continue"
    with pytest.raises(WorkerDied, match=said):
        run_jobs([lambda: time.sleep(0.2), crash, lambda: 3], 2)

    def killed() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises(WorkerDied, match=r"killed by SIGKILL while running job 0 \(out of memory"):
        run_jobs([killed, lambda: 1], 2)
    assert _no_children_left()


def test_workers_ignore_the_signals_a_terminal_sends_the_whole_group() -> None:
    def interrupted() -> str:
        for signum in (signal.SIGINT, signal.SIGHUP):
            os.kill(os.getpid(), signum)
        return "went on"

    assert run_jobs([interrupted, interrupted], 2) == ["went on", "went on"]


def test_sigterm_stops_a_job_with_its_cleanup_and_is_reported(tmp_path) -> None:
    cleaned = tmp_path / "cleaned"

    def stopped() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        finally:
            cleaned.write_text("the job's finally ran")

    with pytest.raises(WorkerDied, match="stopped by SIGTERM while running job 1"):
        run_jobs([lambda: time.sleep(0.2), stopped], 2)
    assert cleaned.read_text() == "the job's finally ran" and _no_children_left()


def test_an_error_in_the_caller_stops_and_reaps_its_workers(tmp_path, monkeypatch) -> None:
    """The caller's own interruption (here: raised by its progress callback) stops workers mid-job: a job's cleanup
    runs (SIGTERM), and one that will not stop is killed after the grace period."""
    started, finished, cleaned = tmp_path / "started", tmp_path / "finished", tmp_path / "cleaned"

    def slow() -> None:
        try:
            started.touch()
            time.sleep(30)
            finished.write_text("a worker outlived its caller")
        finally:
            cleaned.write_text("cleaned up")

    def stubborn() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        started.touch()
        time.sleep(30)
        finished.write_text("a worker outlived its caller")

    def interrupt() -> None:  # once the slow job runs (a hang guard, not a timing: it starts in well under a second)
        deadline = time.monotonic() + 300
        while not started.exists():
            assert time.monotonic() < deadline, "the worker never started its job"
            time.sleep(0.01)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_jobs([lambda: 0, slow, slow], 2, on_done=interrupt)
    assert cleaned.exists() and not finished.exists() and _no_children_left()  # stopped mid-sleep, cleaned up
    started.unlink()
    monkeypatch.setattr(workers_module, "GRACE_S", 0.5)  # the stubborn one waits out the grace: keep it short here
    with pytest.raises(KeyboardInterrupt):
        run_jobs([lambda: 0, stubborn], 2, on_done=interrupt)
    assert _no_children_left() and not finished.exists()


def test_workers_follow_the_cores_the_jobs_and_the_memory() -> None:
    need = EXPORT_MEMORY_FACTOR * 100 + EXPORT_MEMORY_BASE  # bytes one export of a 100-byte model may add
    assert export_workers(5, 100, cores=2, memory=10 * need) == 2
    assert export_workers(5, 100, cores=8, memory=10 * need) == 5  # no more than the jobs
    assert export_workers(5, 100, cores=8, memory=3 * need) == 3  # no more than the memory holds
    assert export_workers(5, 100, cores=8, memory=need // 2) == 1  # at least one: the jobs run here
    assert export_workers(5, 100, cores=4, memory=None) == 4  # memory unknown: the cores decide


def test_a_worker_prints_nothing_where_the_caller_prints(capfd) -> None:
    def chatty() -> int:
        print("from a worker")
        os.write(1, b"from a worker, natively\n")
        return 1

    print("from the caller, unflushed", end="")  # flushed before the fork: printed once, not once a child
    assert run_jobs([chatty, chatty], 2) == [1, 1]
    out, err = capfd.readouterr()
    assert out == "from the caller, unflushed" and "worker" not in err
