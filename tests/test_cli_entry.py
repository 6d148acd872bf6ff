"""The console script's entry point: what it sets for its own process, and only there."""

from __future__ import annotations

import gc

import pytest

import tofu_export.cli as cli


def test_the_command_collects_garbage_less_often_only_in_its_own_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tofu-export`` raises the collector's youngest-generation threshold (``bench/results/gc_threshold.md``); a
    program that imports the CLI and calls ``main`` keeps its own settings."""
    seen: list[tuple[int, ...]] = []
    monkeypatch.setattr(cli, "_run", lambda: seen.append(gc.get_threshold()))
    monkeypatch.setattr(cli, "exit_quietly_on_signals", lambda: None)  # this test process keeps its signal handlers
    before = gc.get_threshold()
    try:
        for entry_point in (False, True):
            gc.set_threshold(700, 10, 10)  # Python's defaults (this suite's conftest changes them)
            monkeypatch.setattr(cli, "_ENTRY_POINT", entry_point)
            cli.main()
    finally:
        gc.set_threshold(*before)
    assert seen == [(700, 10, 10), (50_000, 20, 10)]
