"""One pass of the unreduced model over the calibration images, keeping what every per-block measurement needs.

The pass runs each block as its two residual halves (attention, then MLP; the model family's calibration hooks) so
that the post-attention tokens and the attention keys can be read where ToFu would reduce, without patching:

    x_i [B, N, C]  --attention half-->  y_i [B, N, C]  --MLP half-->  x_{i+1} [B, N, C]

It keeps every block's input ``x_i`` (so a later measurement that reduces in block ``i`` alone runs only blocks
``i..depth-1``), the linearity of every block on the pairs its matching would reduce, and the unreduced pooled
output, the reference every cosine is taken against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from tofu_export.calibration.linearity import linearity_ratio, matched_pairs
from tofu_export.merge import bipartite_soft_matching
from tofu_export.models.family import family_of
from tofu_export.schedule import max_reduction

BATCH = 16  # images a calibration forward runs at once: DINOv2-S/14 on 2 Intel cores took 0.89 (unreduced) and
# 0.93 (ToMe r=20) of the time at 32 a chunk, 0.82 and 0.87 of 48 (bench/results/forward_batch/)


@dataclass
class Trace:
    """The unreduced model's view of the calibration images."""

    inputs: list[Tensor]  # [depth] x [B, N, C]: input of block i
    reference: Tensor  # [B, D] pooled output (pre-logits) of the unreduced model
    linearity: list[Tensor]  # [depth] x [B, r_i]: the criterion on each block's matched pairs

    def subset(self, index: Sequence[int]) -> Trace:
        """The same view of the images at ``index`` (``[k]`` positions): ``[k, ...]`` everywhere."""
        keep = torch.as_tensor(list(index), dtype=torch.long)  # [k]
        return Trace([x[keep] for x in self.inputs], self.reference[keep], [c[keep] for c in self.linearity])

    def first_block_only(self) -> Trace:
        """What running a policy needs (block 0's input, the reference) and the linearity, without the other blocks'
        inputs (``[depth - 1, B, N, C]`` floats: 208 MB for 48 DINOv2-S/14 images)."""
        return Trace(self.inputs[:1], self.reference, self.linearity)


def pooled_output(model: nn.Module, x: Tensor) -> Tensor:
    """Tokens after the last block ``[B, N', C]`` -> the pooled feature ``[B, D]`` (pre-logits, so a classifier is
    compared on its features too)."""
    return family_of(model).pooled_output(model, x)


def trace(model: nn.Module, images: Tensor, r: int, *, batch_size: int = BATCH) -> Trace:
    """Run the unreduced ``model`` over ``images [B, 3, H, W]`` in chunks of ``batch_size``; see the module
    docstring. ``r`` is how many pairs each block's matching takes (clipped to what the block allows)."""
    family = family_of(model)
    depth, num_prefix = family.depth(model), family.num_prefix(model)
    inputs: list[list[Tensor]] = [[] for _ in range(depth)]
    linearity: list[list[Tensor]] = [[] for _ in range(depth)]
    outputs = []
    with torch.no_grad():
        for chunk in images.split(batch_size):
            x = family.embed(model, chunk)
            for i in range(depth):
                inputs[i].append(x)
                y, metric = family.attention_half(model, i, x)
                pairs = min(r, max_reduction(x.shape[1], num_prefix))
                matching = bipartite_soft_matching(metric, pairs, num_prefix)
                pair = matched_pairs(y, matching, num_prefix)  # two [b, pairs, C]
                linearity[i].append(linearity_ratio(partial(family.mlp_half, model, i), *pair))
                x = family.mlp_half(model, i, y)
            outputs.append(family.pooled_output(model, x))
    return Trace([torch.cat(t) for t in inputs], torch.cat(outputs), [torch.cat(t) for t in linearity])


def reference_pass(model: nn.Module, images: Tensor, *, batch_size: int = BATCH) -> Trace:
    """The unreduced pass over ``images [B, 3, H, W]`` that running a policy needs and nothing more: block 0's input
    and the pooled output (no per-block inputs, no linearity)."""
    family = family_of(model)
    with torch.no_grad():
        x0 = torch.cat([family.embed(model, chunk) for chunk in images.split(batch_size)])  # [B, N, C]
        reference = torch.cat([pooled_output(model, family.run_blocks(model, chunk, 0))
                               for chunk in x0.split(batch_size)])  # [B, D]
    return Trace([x0], reference, [])
