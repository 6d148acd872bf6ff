"""Calibration's promises, checked without a full calibration: budgets on synthetic fronts, the held-out split,
and the chosen policy's latency measured on graphs exported with the user's settings."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tofu_export.calibration import measured as measured_module
from tofu_export.calibration.measured import ExportSettings, measure_policy_latency, split_held_out
from tofu_export.calibration.select import Budget, BudgetError, Candidate, choose
from tofu_export.exporters.workers import can_fork

pytestmark = pytest.mark.usefixtures("single_thread")

FRONT = [  # a synthetic front: the unreduced policy, then two reducing ones
    Candidate(("mean",) * 2, (0, 0), 0.0, 10.0),
    Candidate(("mlerp",) * 2, (4, 0), 0.002, 9.0),
    Candidate(("prune",) * 2, (4, 4), 0.02, 8.0),
]


def test_a_floor_only_the_unreduced_model_meets_is_an_error_naming_the_reachable_one() -> None:
    with pytest.raises(BudgetError, match=r"most faithful one is predicted at cosine 0\.99800") as caught:
        choose(FRONT, Budget(min_cosine=0.999), baseline_ms=10.0)
    assert caught.value.hint.option == "min_cosine" and caught.value.hint.value == "0.9980"
    with pytest.raises(BudgetError, match="no policy that removes tokens was found"):
        choose(FRONT[:1], Budget(min_cosine=0.9), baseline_ms=10.0)


def test_a_reachable_floor_picks_the_fastest_reducing_policy() -> None:
    assert choose(FRONT, Budget(min_cosine=0.998), baseline_ms=10.0) == FRONT[1]
    assert choose(FRONT, Budget(min_cosine=0.98), baseline_ms=10.0) == FRONT[2]
    assert choose(FRONT, Budget(speedup=1.2), baseline_ms=10.0) == FRONT[2]


@pytest.mark.parametrize(("count", "fraction", "held"), [(8, 0.25, 2), (10, 0.5, 5), (7, 0.0, 0), (3, 0.25, 0)])
def test_held_out_images_are_an_even_spread_the_search_never_sees(count: int, fraction: float, held: int) -> None:
    images = torch.arange(count, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    search, held_out = split_held_out(images, fraction)
    ids = lambda t: {int(v) for v in t[:, 0, 0, 0]}  # noqa: E731
    assert len(held_out) == held and len(search) == count - held
    assert ids(search).isdisjoint(ids(held_out)) and ids(search) | ids(held_out) == set(range(count))
    if held:
        step = round(1 / fraction)
        assert ids(held_out) == set(range(step - 1, count, step))


@pytest.mark.parametrize(("count", "asked", "measured"), [(256, 64, set(range(0, 256, 4))), (10, 3, {0, 3, 6}),
                                                      (5, 8, set(range(5))), (4, 4, set(range(4)))])
def test_confirm_images_are_what_an_even_spread_of_the_measured_ones_leaves(count: int, asked: int,
                                                                            measured: set[int]) -> None:
    """``calibrate --images K --confirm-images C`` loads K + C images and measures an even spread of K of them; a
    folder with fewer than K images is measured whole and confirms nothing."""
    from tofu_export.calibration.images import split_confirm

    images = torch.arange(count, dtype=torch.float32).view(-1, 1, 1, 1)
    kept, confirm = split_confirm(images, asked)
    assert {int(v) for v in kept.flatten()} == measured and len(kept) == len(measured)
    assert {int(v) for v in confirm.flatten()} == set(range(count)) - measured


def test_policy_latency_is_measured_on_graphs_exported_as_the_user_exports(make_vit, monkeypatch, call_log) -> None:
    """...in two forked workers side by side (``exporters.workers``), the parity gate in this process."""
    model = make_vit("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=0)  # 5 tokens, 1 protected
    monkeypatch.setattr(measured_module, "export_onnx", call_log.spy(measured_module.export_onnx))
    tolerances = []  # the policy graph's gate: the user's tolerance, as `export --policy` will apply it
    real_parity = measured_module.verify_parity
    monkeypatch.setattr(measured_module, "verify_parity",
                        lambda *args, **kwargs: tolerances.append(kwargs["tolerance"]) or real_parity(*args, **kwargs))
    settings = ExportSettings("torchscript", 16, False, "onnxsim", 5e-3, workers=2)
    result = measure_policy_latency(model, ("mlerp", "prune"), (2, 1), settings=settings, threads=1, rounds=3)
    calls = call_log.calls()
    exported = [tuple(c["kwargs"][k] for k in ("exporter", "opset", "simplify", "simplifier", "verify")) for c in calls]
    assert exported == [("torchscript", 16, False, "onnxsim", False)] * 2
    pids = {c["pid"] for c in calls}
    assert (len(pids) == 2 and os.getpid() not in pids) if can_fork() else pids == {os.getpid()}  # one a worker
    assert tolerances == [5e-3]
    assert not hasattr(model, "_tofu")  # the model is left as it was (plain)
    assert (result.exporter, result.opset, result.rounds, result.backend) == ("torchscript", 16, 3, "onnxruntime-cpu")
    assert result.speedup_iqr[0] <= result.speedup <= result.speedup_iqr[1]
    assert result.to_dict()["speedup_iqr"] == list(result.speedup_iqr)


def test_policy_latency_is_timed_on_the_image_given(make_vit, monkeypatch) -> None:
    """``calibrate`` times the graphs on a held-out image: noise can cost a reduced graph more than the unreduced."""
    from tofu_export.engines import ort as ort_module
    from tofu_export.profiling import compare as compare_module

    fed = []

    class Recording(ort_module.OrtRunner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            session = self.session

            class Session:
                def run(self, names, feed):
                    fed.append(next(iter(feed.values())))
                    return session.run(names, feed)

            self.session = Session()

    monkeypatch.setattr(compare_module, "OrtRunner", Recording)  # where the timing opens its runners
    model = make_vit("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=0)
    image = torch.rand(1, 3, 32, 32)
    result = measure_policy_latency(model, ("mean", "mean"), (2, 1), settings=ExportSettings("torchscript"),
                                    threads=1, rounds=2, tome_r=(1,), image=image)
    assert len(fed) == 3 * (1 + 2 * 2)  # three graphs: a warm-up, then per round an untimed and a timed run
    assert all(np.array_equal(x, image.numpy()) for x in fed) and result.rounds == 2
