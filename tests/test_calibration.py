"""Calibration on tiny random ViTs: the criterion, the cached single-block damage, selection, and the whole run.

One calibration (``measure``) is shared by the tests that read it, its block graphs and the chosen policy's timed
graphs exported by TorchScript (the exporter is not what they test; a dynamo block graph is checked by
``test_block_graph_has_the_reduced_token_count``, and that the default settings time the policy on the shipped
exporter's graph by ``test_the_chosen_policy_is_timed_on_the_graph_the_user_ships``)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tofu_export.calibration import Budget, BudgetError, Calibration, calibrate, choose_policy, measure, plot_policy
from tofu_export.calibration.damage import (
    cosine_to,
    damage_trace,
    out_of_reach,
    policy_cosines,
    policy_cosines_to_floor,
    run_from_block,
    single_block_damage,
)
from tofu_export.calibration.latency import block_graph, block_input, sample_token_counts
from tofu_export.calibration.latency_model import NONE, BlockLatency
from tofu_export.calibration.linearity import linearity_ratio
from tofu_export.calibration.measured import ExportSettings, split_held_out
from tofu_export.calibration.select import Candidate, choose, pareto_front
from tofu_export.calibration.shortlist import CONFIRM_FINALISTS, budget_stepped
from tofu_export.calibration.trace import reference_pass, trace
from tofu_export.errors import UserError
from tofu_export.exporters.precision import PARITY_FLOORS
from tofu_export.images import evenly_spaced
from tofu_export.models.timm_vit import is_patched, patch, unpatch
from tofu_export.output_paths import is_tofu_png
from tofu_export.policy import Policy

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vit(make_vit):
    return make_vit("vit_tiny_patch16_224", depth=4, img_size=64, num_classes=0)  # 17 tokens, 1 protected


@pytest.fixture(scope="module")
def calibration(vit, make_images, single_thread) -> Calibration:
    """One calibration of ``vit`` on 8 images (6 searched, 2 held out), r=4, TorchScript block graphs."""
    return measure(vit, make_images(8, 64), r=4, threads=1, progress=False, source={"path": "random"},
                   settings=ExportSettings(exporter="torchscript"))


def test_linearity_is_zero_for_a_linear_map_and_positive_for_a_nonlinear_one() -> None:
    y1, y2 = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    weight = torch.randn(8, 8)
    assert linearity_ratio(lambda t: t @ weight + 1.0, y1, y2).abs().max() < 1e-5
    ratio = linearity_ratio(lambda t: t.square(), y1, y2)
    assert ratio.shape == (2, 5) and bool((ratio > 0.01).all())


def test_single_block_damage_matches_a_full_run_of_the_patched_model(vit, make_images) -> None:
    images = make_images(6, 64)
    tr = trace(vit, images, 3)
    with torch.no_grad():
        reference = vit(images)
    assert torch.allclose(tr.reference, reference, atol=1e-5)
    damage = single_block_damage(vit, tr, 3)
    assert not is_patched(vit)
    for mode in ("prune", "mlerp"):
        patch(vit, r=[0, 3, 0, 0], mode=[mode] * 4)
        with torch.no_grad():
            full = vit(images)
        unpatch(vit)
        assert damage[mode][1] == pytest.approx(float(1 - cosine_to(reference, full).mean()), abs=1e-6)
        assert damage[mode][1] > 1e-5  # removing 3 of 16 tokens changes a random ViT's output


def test_a_policy_run_to_a_floor_stops_only_once_the_floor_is_out_of_reach(vit, make_images) -> None:
    tr = reference_pass(vit, make_images(6, 64, seed=3))
    policy = (["mlerp"] * 4, [4, 4, 0, 0])
    full = policy_cosines(vit, tr, *policy, True)  # [6]
    assert not is_patched(vit) and bool((full < 1 - 1e-4).all())  # every image loses something
    kept = policy_cosines_to_floor(vit, tr, *policy, True, float(full.mean()) - 1e-9, batch_size=2)
    assert torch.allclose(kept, full, atol=1e-9)  # a pass runs on every image
    bound = policy_cosines_to_floor(vit, tr, *policy, True, 1.0, batch_size=2)
    assert torch.allclose(bound, full[:2], atol=1e-9) and not is_patched(vit)  # no mean of 6 reaches 1 after two
    best = (float(full[:5].sum()) + 1.0) / 6  # the sixth image at 1
    assert out_of_reach(full[:5], 6, best + 1e-9) and not out_of_reach(full[:5], 6, best - 1e-9)
    assert not out_of_reach(full[:0], 6, 1.0) and out_of_reach(full, 6, float(full.mean()) + 1e-9)
    order = full.argsort()  # hardest first: every image of a pass, in that order
    first = policy_cosines_to_floor(vit, tr, *policy, True, float(full.mean()) - 1e-9, order=order, batch_size=2)
    assert torch.allclose(first, full[order], atol=1e-9)
    above = float(full.mean() + (1 - full.mean()) / 3)  # a miss: hardest first, certain no later than as traced
    hard, traced = (policy_cosines_to_floor(vit, tr, *policy, True, above, order=o, batch_size=1)
                    for o in (order, None))
    assert len(hard) <= len(traced) < 6 and torch.allclose(hard, full[order][: len(hard)], atol=1e-9)


def _latency(r: int = 4) -> BlockLatency:
    tokens = [5, 9, 17]
    none = [n * 0.1 for n in tokens]
    return BlockLatency(r, tokens, {NONE: none, "prune": [v - 0.05 for v in none], "mean": [v - 0.02 for v in none],
                                    "mlerp": [v - 0.01 for v in none]}, {}, 0.5, 10, "test")


def test_pareto_front_spans_no_reduction_to_fastest_and_is_monotone() -> None:
    damage = {"prune": {4: [0.01, 0.02, 0.03, 0.0]}, "mean": {4: [0.001, 0.002, 0.01, 0.0]},
              "mlerp": {4: [0.002, 0.001, 0.02, 0.0]}}
    front = pareto_front(damage, _latency(), 17, 1)
    assert front[0].damage == 0.0 and front[0].r == (0, 0, 0, 4)  # the last block's reduction is free here
    assert all(a.damage <= b.damage and a.latency_ms > b.latency_ms for a, b in itertools.pairwise(front))
    fastest = front[-1]
    assert fastest.modes[:3] == ("prune",) * 3 and fastest.r == (4, 4, 4, 0)  # 5 tokens left: block 3 cannot
    floor = choose(front, Budget(min_cosine=0.995), baseline_ms=6.0)
    assert floor.damage <= 0.005
    assert all(c.latency_ms >= floor.latency_ms for c in front if c.damage <= 0.005)
    fast = choose(front, Budget(speedup=1.1), baseline_ms=6.0)
    assert fast.latency_ms <= 6.0 / 1.1
    assert all(c.damage >= fast.damage for c in front if c.latency_ms <= 6.0 / 1.1)


def test_an_unreachable_latency_budget_names_the_reachable_one() -> None:
    front = [Candidate(("mean",) * 2, (0, 0), 0.0, 10.0), Candidate(("prune",) * 2, (4, 4), 0.1, 8.0)]
    with pytest.raises(BudgetError, match=r"fastest one at r=4 is predicted 8.0 ms \(1.25x") as caught:
        choose(front, Budget(speedup=2.0), baseline_ms=10.0)
    assert caught.value.hint.option == "speedup" and caught.value.hint.value == "1.25"
    with pytest.raises(BudgetError, match=r"no policy reaches 5\.0 ms"):
        choose(front, Budget(max_latency_ms=5.0), baseline_ms=10.0)


@pytest.mark.parametrize("kwargs", [{}, {"min_cosine": 0.9, "speedup": 1.2}, {"min_cosine": 1.5}, {"speedup": -1}])
def test_budget_needs_exactly_one_valid_target(kwargs) -> None:
    with pytest.raises(BudgetError):
        Budget(**kwargs)


def test_sample_token_counts_span_the_uniform_plan() -> None:
    assert sample_token_counts(257, 1, 16, 12) == [81, 161, 257]
    assert sample_token_counts(17, 1, 4, 4) == [5, 9, 17]


@pytest.mark.parametrize(("exporter", "opset"), [("torchscript", 16), ("dynamo", 17)])
def test_block_graph_has_the_reduced_token_count(vit, tmp_path, exporter, opset) -> None:
    import onnx

    path = block_graph(vit, "mlerp", 13, 4, settings=ExportSettings(exporter, opset), folder=tmp_path)
    graph = onnx.load(str(path))
    dims = [d.dim_value or d.dim_param for d in graph.graph.output[0].type.tensor_type.shape.dim]
    assert dims[1:] == [9, 192] and isinstance(dims[0], str)  # the user's exporter: a symbolic batch
    assert graph.opset_import[0].version == opset
    assert not any(node.op_type.startswith("Scatter") for node in graph.graph.node)
    ops = {node.op_type for node in graph.graph.node}
    assert "Log" in ops  # proportional attention's mask: the block is entered with token sizes


def test_the_unsized_block_graph_has_no_proportional_attention_mask(vit, tmp_path) -> None:
    import onnx

    path = block_graph(vit, NONE, 13, 4, settings=ExportSettings("torchscript", 17), folder=tmp_path, sized=False)
    assert "Log" not in {node.op_type for node in onnx.load(str(path)).graph.node}


def test_a_timed_block_is_fed_its_own_input_with_its_tokens_evenly_spread() -> None:
    block_in = torch.randn(3, 17, 8)  # [B, N, C]
    fed = block_input(block_in, 1, 9)
    assert fed.shape == (1, 9, 8) and fed.dtype == block_in.numpy().dtype
    rows = [next(j for j in range(17) if torch.equal(torch.from_numpy(row), block_in[0, j])) for row in fed[0]]
    assert rows == [0, 1, 3, 5, 7, 10, 12, 14, 16]  # the first image: its prefix, then 8 of 16 tokens end to end
    assert block_input(block_in, 1, 17).tolist() == block_in[:1].tolist()  # all the tokens: the input itself


def test_the_calibration_times_the_block_without_sizes_too(calibration) -> None:
    latency = calibration.latency
    assert len(latency.unsized_ms) == len(latency.tokens) and all(ms > 0 for ms in latency.unsized_ms)
    assert set(latency.block_ms) == {NONE, "prune", "mean", "mlerp"}  # not a mode: kept apart


def test_block_graphs_are_exported_as_the_user_exports(vit, tmp_path, monkeypatch) -> None:
    """Every export setting of ``calibrate`` reaches the graphs it times (the simplifier used to stay the default)."""
    from tofu_export.calibration import measured

    seen: dict = {}

    def stop(module, path, size, **settings) -> None:
        seen.update(settings)
        raise RuntimeError("stop before exporting")

    monkeypatch.setattr(measured, "export_onnx", stop)  # ExportSettings.export: every calibration graph's one call
    with pytest.raises(RuntimeError, match="stop before exporting"):
        block_graph(vit, "mlerp", 13, 4, settings=ExportSettings("torchscript", 16, True, "onnxsim"), folder=tmp_path)
    assert {key: seen[key] for key in ("exporter", "opset", "simplify", "simplifier")} == {
        "exporter": "torchscript", "opset": 16, "simplify": True, "simplifier": "onnxsim"}


def test_calibration_returns_a_verified_policy_that_fits(calibration, vit, make_images, tmp_path) -> None:
    images = make_images(8, 64)
    policy = choose_policy(calibration, Budget(min_cosine=0.99))
    assert isinstance(policy, Policy) and not is_patched(vit)
    policy.check_fits(vit, 64)
    m = policy.measurements
    assert set(m["damage"]) == {"prune", "mean", "mlerp"} and len(m["linearity"]) == 4
    assert m["damage_measured_at"] == [4, 8] and set(m["damage_by_r"]["mlerp"]) == {"2", "4", "6", "8"}
    assert m["damage_by_r"]["mlerp"]["4"] == m["damage"]["mlerp"] and m["rule"] == "damage"
    assert set(policy.r) <= {0, 2, 4, 6, 8} and len(m["rule_modes"]["linearity"]) == 4
    assert m["measured_cosine"] >= 0.99
    search, held = split_held_out(images, 0.25)
    assert len(search) == 6 and len(held) == 2 and m["held_out_images"] == 2
    patch(vit, r=list(policy.r), mode=list(policy.modes))  # the recorded cosines are the policy's real ones
    with torch.no_grad():
        measured = float(cosine_to(_plain(vit, search), vit(search)).mean())
        held_cosines = cosine_to(_plain(vit, held), vit(held))  # [2]
        held_out = float(held_cosines.mean())
    unpatch(vit)
    assert m["held_out_standard_error"] == pytest.approx(float(held_cosines.std() / 2**0.5), abs=1e-6)
    assert measured == pytest.approx(m["measured_cosine"], abs=1e-6)
    assert held_out == pytest.approx(m["held_out_cosine"], abs=1e-6)
    timed = m["measured_latency"]  # the chosen policy's exported graph, timed against the unreduced one
    assert timed["rounds"] == 20 and timed["exporter"] == "torchscript" and timed["opset"] == 17  # the fixture's
    gate = timed["export_parity"]  # the policy graph held to the gate `export --policy` applies
    assert set(gate) == {"ok", "min_cosine", "images_within_tolerance", "advice"}
    floor = PARITY_FLOORS["fp32"]
    within = gate["images_within_tolerance"] >= floor.min_within
    assert gate["ok"] == (gate["min_cosine"] >= floor.min_cosine and within)
    assert (gate["advice"] is None) == gate["ok"]
    assert m["measured_speedup"] == timed["speedup"] and timed["speedup_iqr"][0] <= timed["speedup"]
    assert m["predicted_speedup"] == pytest.approx(m["baseline_ms"] / m["predicted_ms"])
    tome = m["tome_at_measured_speedup"]  # ToMe timed in the same rounds at three r, interpolated at the policy's speed
    assert len(tome["r"]) == 3 and sorted(timed["tome_speedup"]) == sorted(str(k) for k in tome["r"])
    assert min(tome["cosine_at_r"]) - 1e-9 <= tome["cosine"] or tome["extrapolated"]
    lead = m["held_out_vs_tome"]  # image by image against ToMe at the policy's speed: the same mean lead, with its SE
    assert lead["images"] == 2 and lead["standard_error"] >= 0
    assert lead["difference"] == pytest.approx(m["held_out_cosine"] - tome["held_out_cosine"], abs=1e-12)
    assert policy.source["images"] == {"path": "random", "count": 8, "held_out": 2, "confirm": 0, "damage": 6}
    assert policy.source["tool"].startswith("tofu-export ")
    assert Policy.load(policy.save(tmp_path / "policy.json")) == policy
    png = plot_policy(policy, tmp_path / "policy.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and is_tofu_png(png)  # a later run may replace it


def test_the_chosen_policy_is_timed_on_the_graph_the_user_ships(calibration, monkeypatch, call_log) -> None:
    """Default settings: the policy, the unreduced model and ToMe are timed as ``export`` ships them (dynamo, opset
    17, simplified by onnxslim), without the parity check (``measure_policy_latency`` holds the policy graph to the
    export's gate itself). The first export stops the run: a worker's error reaches the caller, and at most one
    export a worker began."""
    from tofu_export.calibration import measured

    def stop(module, path, size, **settings) -> None:
        raise RuntimeError("stop before exporting")

    monkeypatch.setattr(measured, "export_onnx", call_log.spy(stop))
    shipped = dataclasses.replace(calibration, settings=ExportSettings())
    with pytest.raises(RuntimeError, match="stop before exporting"):
        choose_policy(shipped, Budget(min_cosine=0.99))
    keys = ("exporter", "opset", "simplify", "simplifier", "verify")
    seen = [call["kwargs"] for call in call_log.calls()]
    assert 1 <= len(seen) <= ExportSettings().workers_for(5, calibration.model)
    assert all({key: s[key] for key in keys} == {
        "exporter": "dynamo", "opset": 17, "simplify": True, "simplifier": "onnxslim", "verify": False} for s in seen)


def _plain(model, images):
    unpatched = {"r": list(model._tofu.r), "modes": list(model._tofu.modes)}
    unpatch(model)
    with torch.no_grad():
        out = model(images)
    patch(model, r=unpatched["r"], mode=unpatched["modes"])
    return out


def test_calibrate_refuses_bad_input(vit, make_images) -> None:
    with pytest.raises(UserError, match=r"are \[32, 32\] but the model takes \[64, 64\]"):
        calibrate(vit, make_images(8, 32), progress=False)
    with pytest.raises(UserError, match=r"r must lie in \[1, 8\]"):
        calibrate(vit, make_images(8, 64), r=9, progress=False)
    with pytest.raises(UserError, match="unknown mode rule"):  # before any measurement
        calibrate(vit, make_images(8, 64), r=4, rule="coin", progress=False)


def test_the_damage_is_measured_on_an_even_spread_of_the_search_images(calibration, vit, make_images,
                                                                      monkeypatch) -> None:
    """``damage_images`` of the 6 search images: the damage table and the anchors are those of a calibration on
    just those images; the search still runs every candidate on all 6. No block graph is exported (the fixture's
    latency model is reused) and 0 damage images is refused before any forward."""
    from tofu_export.calibration import search

    monkeypatch.setattr(search, "measure_block_latency", lambda *args, **kwargs: calibration.latency)
    images = make_images(8, 64)
    subset = measure(vit, images, r=4, threads=1, progress=False, damage_images=3)
    search_images = split_held_out(images, 0.25)[0]  # [6]
    assert evenly_spaced(range(6), 3) == [0, 2, 4]
    alone = measure(vit, search_images[[0, 2, 4]], r=4, threads=1, progress=False, holdout=0)
    assert subset.damage == alone.damage and subset.record["images"]["damage"] == 3
    assert {m: u["measured_cosine"] for m, u in subset.uniform.items()} == pytest.approx(
        {m: u["measured_cosine"] for m, u in alone.uniform.items()}, abs=1e-12)
    assert len(subset.trace.reference) == 6 and len(subset.trace.inputs) == 1  # the search's images: all of them
    assert torch.allclose(subset.trace.reference, calibration.trace.reference, atol=1e-6)
    full = trace(vit, search_images, 4)
    picked = full.subset([0, 2, 4])
    assert all(torch.equal(a, b[[0, 2, 4]]) for a, b in zip(picked.inputs, full.inputs, strict=True))
    assert damage_trace(full, 6) is full and damage_trace(full, None) is full and len(picked.inputs) == 4
    monkeypatch.setattr(search, "trace", lambda *args, **kwargs: pytest.fail("traced before the check"))
    with pytest.raises(UserError, match="at least one image, asked for 0"):
        measure(vit, images, r=4, threads=1, progress=False, damage_images=0)


def test_the_reference_pass_is_the_traces_first_input_and_output(vit, make_images) -> None:
    images = make_images(3, 64, seed=5)
    full, lean = trace(vit, images, 4), reference_pass(vit, images)
    assert torch.equal(lean.inputs[0], full.inputs[0]) and len(lean.inputs) == 1 and not lean.linearity
    assert torch.allclose(lean.reference, full.reference, atol=1e-5)


def test_a_latency_budget_runs_its_finalists_on_the_confirm_images(calibration, vit, make_images) -> None:
    confirm = reference_pass(vit, make_images(5, 64, seed=7))
    confirming = dataclasses.replace(calibration, confirm=confirm)
    limit = calibration.latency.predict_ms(17, 1, [4] * 4, ["mean"] * 4) + 1e-9
    m = choose_policy(confirming, Budget(max_latency_ms=limit), measure_latency=False).measurements
    finalists = [c for c in m["candidates"] if "confirm_cosine" in c]
    assert len(finalists) == min(CONFIRM_FINALISTS, len(m["candidates"]))
    assert "4 highest also on 5 confirm images" in m["choice"]
    assert min(c["measured_cosine"] for c in finalists) >= max(
        c["measured_cosine"] for c in m["candidates"] if "confirm_cosine" not in c)  # the search's best
    for c in finalists:
        patch(vit, r=c["r"], mode=c["modes"])
        with torch.no_grad():
            output = run_from_block(vit, confirm.inputs[0], 0)
        unpatch(vit)
        assert float(cosine_to(confirm.reference, output).mean()) == pytest.approx(c["confirm_cosine"], abs=1e-9)
        assert c["combined_cosine"] == pytest.approx((6 * c["measured_cosine"] + 5 * c["confirm_cosine"]) / 11)
    chosen = next(c for c in m["candidates"] if c["chosen"])
    assert chosen in finalists and "within one paired standard error" in m["choice"]
    assert not any(c["predicted_ms"] < chosen["predicted_ms"] and c["combined_cosine"] > chosen["combined_cosine"]
                   for c in finalists)  # the fastest within noise of the best: nothing faster measures higher
    assert m["attempts"][-1]["confirm_cosine"] == chosen["confirm_cosine"]


def test_a_floors_fastest_passes_are_run_on_the_confirm_images(calibration, vit, make_images) -> None:
    confirm = reference_pass(vit, make_images(5, 64, seed=7))
    m = choose_policy(dataclasses.replace(calibration, confirm=confirm), Budget(min_cosine=0.99),
                      measure_latency=False).measurements
    confirmed = sorted((c for c in m["candidates"] if "confirm_cosine" in c), key=lambda c: c["predicted_ms"])
    passes = sorted((c for c in m["candidates"] if c["measured_cosine"] >= 0.99), key=lambda c: c["predicted_ms"])
    assert 1 <= len(confirmed) <= CONFIRM_FINALISTS and "run again on 5 confirm images" in m["choice"]
    assert [c["predicted_ms"] for c in confirmed] == [c["predicted_ms"] for c in passes[:len(confirmed)]]
    chosen = next(c for c in m["candidates"] if c["chosen"])
    kept = [c for c in confirmed if c["combined_cosine"] >= 0.99]
    assert chosen == (kept[0] if kept else max(confirmed, key=lambda c: c["combined_cosine"]))
    assert len(kept) <= 1 and (not kept or kept[0] is confirmed[-1])  # it stops at the first that keeps it


def test_an_unreachable_speedup_names_the_fastest_policy(calibration) -> None:
    with pytest.raises(BudgetError, match=r"no policy reaches a 50\.00x speedup"):
        choose_policy(calibration, Budget(speedup=50.0), measure_latency=False)


@pytest.mark.parametrize("rule", ["damage", "linearity"])
def test_a_latency_budget_is_chosen_by_measurement_among_the_shortlist(calibration, vit, rule) -> None:
    modes = calibration.rule_modes()
    uniform = ["mean"] * 4 if rule == "damage" else modes["linearity"]  # ToMe; the paper's modes
    limit = calibration.latency.predict_ms(17, 1, [4] * 4, uniform) + 1e-9  # the budget: uniform r=4's latency
    policy = choose_policy(calibration, Budget(max_latency_ms=limit), measure_latency=False, rule=rule)
    m = policy.measurements
    assert m["choice"].startswith("measured") and m["rule"] == rule and "measured_latency" not in m
    candidates = m["candidates"]
    chosen = [c for c in candidates if c["chosen"]]
    assert len(chosen) == 1 and (chosen[0]["modes"], chosen[0]["r"]) == (list(policy.modes), list(policy.r))
    assert chosen[0]["measured_cosine"] == m["measured_cosine"]
    assert not any(c["predicted_ms"] < chosen[0]["predicted_ms"] and c["measured_cosine"] > m["measured_cosine"]
                   for c in candidates)  # the fastest within noise of the best: nothing faster measures higher
    assert all(c["predicted_ms"] <= limit for c in candidates) and m["predicted_ms"] <= limit
    assert candidates[0]["source"] == "front #0"
    assignments = ({"tome": ["mean"] * 4, "mlerp": ["mlerp"] * 4, "prune": ["prune"] * 4,
                    "damage-rule modes": modes["damage"]} if rule == "damage" else
                   {"linearity-rule modes": modes["linearity"]})
    scaled = calibration.scaled_damage()
    stepped = budget_stepped((assignments, [0, 2, 4, 6, 8], scaled, calibration.latency, 17, 1), limit)
    assert {s.split()[0] for s, _ in stepped} >= ({"tome"} if rule == "damage" else {"linearity-rule"})
    assert any(s.endswith("one-token steps") for s, _ in stepped)

    def key(modes: list[str], r: list[int]) -> tuple:
        return tuple(mo if k else "-" for mo, k in zip(modes, r, strict=True)), tuple(r)

    # every stepped policy the budget allows (uniform ToMe's among them) was measured, so the choice cannot measure
    # worse than it; under the linearity rule only the paper's per-block modes are candidates
    assert {key(list(c.modes), list(c.r)) for _, c in stepped} <= {key(c["modes"], c["r"]) for c in candidates}
    if rule == "linearity":
        assert all(c["modes"][i] == modes["linearity"][i] for c in candidates for i, k in enumerate(c["r"]) if k)
    images = calibration.trace.inputs[0]  # the search images' embeddings: the recorded cosines are real runs
    for c in candidates[:2]:
        patch(vit, r=c["r"], mode=c["modes"])
        with torch.no_grad():
            output = run_from_block(vit, images, 0)
        unpatch(vit)
        assert float(cosine_to(calibration.trace.reference, output).mean()) == pytest.approx(c["measured_cosine"],
                                                                                             abs=1e-6)
