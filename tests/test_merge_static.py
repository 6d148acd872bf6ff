"""The static (scatter-free) fold against the eager scatter_reduce path, on hand-made matchings where several
sources share a destination, and per sample."""

from __future__ import annotations

import pytest
import torch

from tofu_export.merge import Matching, bipartite_soft_matching, reduce_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


def _tokens(batch: int, num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B, N, 8]`` with varied norms and integer sizes ``[B, N, 1]`` in 1..5."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_tokens, 8, generator=generator) * torch.rand(batch, num_tokens, 1, generator=generator)
    return x * 4 + 0.1, torch.randint(1, 6, (batch, num_tokens, 1), generator=generator).float()


def _shared_destinations() -> Matching:
    """13 tokens, 2 prefix (A = 2,4,..,12: 6 tokens; B = 3,5,..,11: 5 tokens), r = 4: sample 0 sends three sources
    to B[2], sample 1 sends all four to B[0]."""
    return Matching(
        unm_idx=torch.tensor([[0, 5], [1, 4]]).unsqueeze(-1),
        src_idx=torch.tensor([[3, 1, 4, 2], [5, 0, 3, 2]]).unsqueeze(-1),
        dst_idx=torch.tensor([[2, 2, 4, 2], [0, 0, 0, 0]]).unsqueeze(-1),
    )


@pytest.mark.parametrize("mode", ["mean", "prune", "mlerp"])
@pytest.mark.parametrize("with_size", [False, True], ids=["fresh", "sized"])
def test_static_equals_eager_when_sources_share_a_destination(mode: str, with_size: bool) -> None:
    x, size = _tokens(2, 13, seed=1)
    sizes = size if with_size else None
    eager = reduce_tokens(x, sizes, _shared_destinations(), mode, 2, static=False)
    static = reduce_tokens(x, sizes, _shared_destinations(), mode, 2, static=True)
    assert static[0].shape == (2, 9, 8)
    # tokens up to ~11 in size: a few float32 ulps (the one-hot fold differs from eager by 1.4e-6 here)
    torch.testing.assert_close(static[0], eager[0], rtol=1e-6, atol=1e-6)
    if mode == "prune" and not with_size:
        assert static[1] is None and eager[1] is None
    else:
        assert torch.equal(static[1], eager[1])


@pytest.mark.parametrize("mode", ["mean", "mlerp"])
def test_every_sample_is_reduced_on_its_own(mode: str) -> None:
    """Batch offsets: sample 1 reduced in a batch equals sample 1 reduced alone (no rows leak across samples)."""
    x, size = _tokens(3, 21, seed=2)
    matching = bipartite_soft_matching(torch.randn(3, 21, 4, generator=torch.Generator().manual_seed(3)), 7, 1)
    batch = reduce_tokens(x, size, matching, mode, 1, static=True)
    one = Matching(*(idx[1:2] for idx in matching))
    alone = reduce_tokens(x[1:2], size[1:2], one, mode, 1, static=True)
    torch.testing.assert_close(batch[0][1:2], alone[0], rtol=0, atol=0)
    assert torch.equal(batch[1][1:2], alone[1])

