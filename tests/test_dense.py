"""Dense ToFu: window destinations, matching, reduce and unmerge, the per-block plan and its policy file."""

from __future__ import annotations

import pytest
import torch

from tofu_export.dense.module import DenseToFu, tokens_to_remove
from tofu_export.dense.plan import BlockPlan, DensePolicy, plan_blocks
from tofu_export.dense.tofu import dense_tofu, match_dense, reduce_dense, unmerge_dense
from tofu_export.dense.windows import window_layout
from tofu_export.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: tiny models, one intra-op thread


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


@pytest.mark.parametrize("seed", [None, 0, 7])
def test_one_destination_per_window(seed: int | None) -> None:
    layout = window_layout(6, 8, stride=2, seed=seed)
    assert layout.num_dst == 12 and layout.num_src == 36
    rows, cols = layout.dst // 8 // 2, layout.dst % 8 // 2
    assert sorted((rows * 4 + cols).tolist()) == list(range(12))  # every window exactly once
    order = torch.cat([layout.src, layout.dst])
    assert torch.equal(order[layout.inverse], torch.arange(48))
    if seed is None:
        assert torch.equal(layout.dst % 2, torch.zeros(12, dtype=torch.long))  # top-left of each window


def test_seeded_layout_is_frozen_and_differs_by_seed() -> None:
    a, b, c = window_layout(8, 8, 2, seed=3), window_layout(8, 8, 2, seed=3), window_layout(8, 8, 2, seed=4)
    assert torch.equal(a.dst, b.dst) and not torch.equal(a.dst, c.dst)


def test_partial_border_windows_are_sources() -> None:
    layout = window_layout(5, 5, stride=2)
    assert layout.num_dst == 4 and layout.num_src == 21


def test_exported_dense_matching_has_no_grad_mode_subgraph() -> None:
    """Detached, not under ``no_grad``: ``torch.export`` captures a grad-mode switch as a subgraph, which costs the
    export time (``test_merge``'s twin); the norms MLERP reuses carry no gradient."""
    layout = window_layout(4, 4, 2, seed=1)

    class Match(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            matching = match_dense(x, layout, 5)
            return matching.token_map, matching.norms

    x = torch.randn(2, 16, 8)
    program = torch.export.export(Match(), (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if "grad" in t or "higher_order" in t], targets
    assert any("topk" in t for t in targets)  # the matching was traced, at the top level
    assert not match_dense(x.requires_grad_(), layout, 5).norms.requires_grad


@pytest.mark.parametrize("mode", ["prune", "mean", "mlerp"])
def test_identity_roundtrip_changes_exactly_the_matched_sources(mode: str) -> None:
    torch.manual_seed(0)
    layout, r = window_layout(6, 6, 2, seed=1), 10
    x = torch.randn(3, 36, 16)
    matching = match_dense(x, layout, r)
    reduced = reduce_dense(x, matching, layout, mode)
    assert reduced.shape == (3, 26, 16)
    out = unmerge_dense(reduced, matching)
    assert out.shape == x.shape
    moved = set()
    for b in range(3):
        merged_src = layout.src[matching.src_idx[b, :, 0]]
        targets = layout.dst[matching.dst_idx[b, :, 0]]
        changed = (out[b] - x[b]).abs().amax(-1) > 0
        if mode == "prune":  # destinations unchanged; each matched source carries its destination's value
            assert changed.sum() == r
            assert torch.equal(out[b, merged_src], x[b, targets])
        else:
            assert not changed[layout.src[matching.unm_idx[b, :, 0]]].any()  # unmatched sources untouched
            assert torch.allclose(out[b, merged_src], out[b, targets])
        moved.add(tuple(merged_src.tolist()))
    assert len(moved) > 1  # the matching depends on the sample


def test_mean_and_mlerp_destinations() -> None:
    torch.manual_seed(1)
    layout = window_layout(4, 4, 2)
    x = torch.randn(1, 16, 8)
    matching = match_dense(x, layout, 12)  # every source merged
    mean = reduce_dense(x, matching, layout, "mean")
    mlerp = reduce_dense(x, matching, layout, "mlerp")
    for d in range(4):
        pairs = zip(matching.src_idx[0, :, 0], matching.dst_idx[0, :, 0], strict=True)
        members = [layout.dst[d].item()] + [layout.src[s].item() for s, t in pairs if t == d]
        assert torch.allclose(mean[0, d], x[0, members].mean(0), atol=1e-6)
        assert torch.allclose(mlerp[0, d].norm(), x[0, members].norm(dim=-1).max(), atol=1e-5)
        assert torch.allclose(torch.cosine_similarity(mlerp[0, d], mean[0, d], dim=0), torch.tensor(1.0), atol=1e-5)


def test_r_zero_is_exact_and_fn_sees_fewer_tokens() -> None:
    layout = window_layout(4, 4, 2)
    x = torch.randn(2, 16, 4)
    assert torch.equal(dense_tofu(x, layout, 0, "mlerp", identity), x)
    seen = []
    dense_tofu(x, layout, 6, "mean", lambda t: seen.append(t.shape[1]) or t * 2)
    assert seen == [10]
    with pytest.raises(ValueError, match="out of range"):
        match_dense(x, layout, 13)


def test_module_ratio_and_buffers_stay_out_of_the_state_dict() -> None:
    block = DenseToFu(8, 8, ratio=0.5, mode="mlerp", seed=2)
    assert block.r == 32 and block.state_dict() == {}
    assert tokens_to_remove(64, 0.9, 48) == 48
    with pytest.raises(ValueError):
        DenseToFu(8, 8, 0.5, "median")  # type: ignore[arg-type]


def test_plan_max_downsample_and_policy_file(tmp_path) -> None:
    grids = {"a": (32, 32), "b": (16, 16), "c": (8, 8)}
    assert set(plan_blocks(grids, 0.5, "mean").blocks) == {"a"}
    assert set(plan_blocks(grids, 0.5, "mean", max_downsample=2).blocks) == {"a", "b"}
    policy = DensePolicy({"a": BlockPlan(0.5, "mlerp"), "b": BlockPlan(0.25, "prune")}, stride=2, seed=5)
    policy.save(tmp_path / "p.json")
    assert DensePolicy.load(tmp_path / "p.json") == policy
    (tmp_path / "bad.json").write_text('{"kind": "tofu-dense-policy", "blocks": {"a": {"ratio": 1.5, "mode": "mean"}}}')
    with pytest.raises(UserError, match="out of range"):
        DensePolicy.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="not a dense ToFu policy"):
        DensePolicy.load(tmp_path / "other.json")
    with pytest.raises(UserError, match="unknown reduce mode"):
        plan_blocks(grids, 0.5, "avg")  # type: ignore[arg-type]


def _fake_denoiser(damage: dict[str, float], saving: dict[str, float]):
    """A sampler whose PSNR falls by ``damage[b]`` per reduced block, and a cost of ``10 - saving`` per policy."""
    from tofu_export.dense.metrics import mean_psnr

    reference = torch.ones(1, 1, 16, 16)

    def run(policy: DensePolicy) -> torch.Tensor:
        total = sum(damage[b] for b in policy.blocks)  # noise power grows with the damage
        return reference + (10 ** (total / 20 - 3)) * torch.ones_like(reference) * (1 if policy.blocks else 0)

    def cost(policy: DensePolicy) -> float:
        return 10.0 - sum(saving[b] for b in policy.blocks)

    def psnr(*blocks: str) -> float:
        return mean_psnr(run(DensePolicy({b: BlockPlan(0.5, "mean") for b in blocks})), reference)

    assert psnr() == float("inf") and psnr("a", "b", "c") < psnr("b", "c") < psnr("c")
    return run, cost, psnr


def test_speedup_budget_keeps_the_predicted_speedup_and_names_what_is_reachable() -> None:
    from tofu_export.dense.calibrate import calibrate_denoiser

    damage, saving = {"a": 20.0, "b": 5.0, "c": 1.0}, {"a": 1.0, "b": 1.0, "c": 1.0}
    run, cost, psnr = _fake_denoiser(damage, saving)
    # every block: 10 / 7 = 1.43x; the budget 1.2x allows dropping one block (10 / 8 = 1.25x): the most damaging
    result = calibrate_denoiser(run, list(damage), 0.5, modes=("mean",), speedup=1.2, cost=cost)
    assert set(result.policy.blocks) == {"b", "c"} and result.policy.notes["predicted_speedup"] == pytest.approx(1.25)
    with pytest.raises(UserError, match=r"1\.5x is not reachable at ratio 0\.5: .* gives 1\.429x"):
        calibrate_denoiser(run, list(damage), 0.5, modes=("mean",), speedup=1.5, cost=cost)
    # both budgets: a PSNR that needs 'b' dropped too (10 / 9 = 1.11x < 1.2x) is refused, naming the reachable PSNR
    between = (psnr("b", "c") + psnr("c")) / 2
    with pytest.raises(UserError, match=r"not reachable at a predicted speed-up of 1\.2x"):
        calibrate_denoiser(run, list(damage), 0.5, modes=("mean",), min_psnr=between, speedup=1.2, cost=cost)
    met = calibrate_denoiser(run, list(damage), 0.5, modes=("mean",), min_psnr=psnr("b", "c") - 0.1, speedup=1.2,
                             cost=cost)
    assert set(met.policy.blocks) == {"b", "c"}


def test_mlerp_reuses_the_matching_norms_only_on_the_tensor_it_matched() -> None:
    torch.manual_seed(3)
    layout = window_layout(6, 6, 2)
    x = torch.randn(2, 36, 8)
    matching = match_dense(x, layout, 20)
    assert matching.metric is x and matching.norms.shape == (2, 36, 1)
    reused = reduce_dense(x, matching, layout, "mlerp")  # norms gathered from the matching
    computed = reduce_dense(x.clone(), matching, layout, "mlerp")  # another tensor: norms computed on it
    torch.testing.assert_close(reused, computed, atol=1e-6, rtol=1e-6)
    y = torch.randn(2, 36, 8)  # a later sub-layer's input under the same matching: its own norms, not x's
    out = reduce_dense(y, matching, layout, "mlerp")[:, 36 - 20 - layout.num_dst:]  # the destinations
    for b in range(2):
        for d in range(layout.num_dst):
            members = [layout.dst[d].item()] + [layout.src[s].item() for s, t in
                                                zip(matching.src_idx[b, :, 0], matching.dst_idx[b, :, 0], strict=True)
                                                if t == d]
            assert torch.allclose(out[b, d].norm(), y[b, members].norm(dim=-1).max(), atol=1e-5)
