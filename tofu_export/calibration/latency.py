"""The latency of one block per reduce mode, measured on the backend: one-block ONNX graphs timed interleaved.

For a few token counts ``N`` (those the blocks of a uniform-r model receive: first, middle, last), one block of the
model is exported five times as a static graph ``[B, N, C] -> [B, N - r, C]``: without reduction, entered with
token sizes and without (``UNSIZED``: proportional attention's mask is there only once a block before has merged),
and removing ``r`` tokens with each of prune, mean and MLERP (the same static rewrite the full export uses), entered
with sizes. Each graph is fed what its block receives: the block's input in the calibration's unreduced pass (its
prefix and N - prefix of its other tokens, evenly spread), the stem graph a calibration image. Random inputs would
not do: a block's time depends on its input's values (on a 2-vCPU Intel Xeon VM, ONNX Runtime's MatMul and Softmax
ran 1.4x and 5x as long on a standard normal input as on DINOv2-S/14's own, and the predicted speed-up of ToMe r=16
was 1.67x against 1.47x measured). The graphs go through ``exporters.onnx.export_onnx`` with the user's
exporter, opset and simplification (``ExportSettings``); the block's r is what ``schedule.plan_tokens`` allows at
N. The graphs, and one of the model without blocks (patch embedding and head), are timed round-robin in one
process, in a fresh order every round. A block at another token count is interpolated linearly between the
measured ones; a block that removes ``removed`` tokens instead of ``r`` runs its MLP on ``r - removed`` more tokens,
priced at the MLP's share of the measured unreduced block (its multiply-accumulates per token over the block's,
``schedule.block_macs``): predictions, which ``calibration.measured`` checks on the chosen policy's exported graph.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tofu_export.calibration.latency_model import NONE, BlockLatency
from tofu_export.calibration.measured import ExportSettings
from tofu_export.engines.ort import create_session
from tofu_export.exporters.workers import run_jobs
from tofu_export.models.family import family_of, num_tokens, patch, tofu_state
from tofu_export.names import REDUCE_MODES
from tofu_export.profiling.compare import time_round_robin
from tofu_export.profiling.timing import QUARTILES, clock_threads
from tofu_export.schedule import block_macs, plan_tokens

UNSIZED = "none-unsized"  # the unreduced block entered without token sizes, as every block before the first merge


def mlp_share(model: nn.Module, tokens: int) -> float:
    """The MLP's multiply-accumulates per token over an unreduced block's per token, at ``tokens`` tokens."""
    family = family_of(model)
    c = family.costs(model)
    block = block_macs(tokens, 0, c.dim, c.hidden, family.num_prefix(model), c.metric_dim)
    return 2 * c.dim * c.hidden * tokens / block


def _skeleton(model: nn.Module, blocks: Sequence[nn.Module]) -> nn.Module:
    """``model``'s embedding and head holding ``blocks`` (the family's ``with_blocks``); ``model`` is untouched."""
    return family_of(model).with_blocks(model, blocks)


def block_graph(model: nn.Module, mode: str, tokens: int, r: int, prop_attn: bool = True,
                settings: ExportSettings | None = None, folder: Path | None = None, sized: bool = True) -> Path:
    """Export a copy of ``model``'s first block receiving ``tokens`` and removing ``r`` (as ``plan_tokens``
    allows) with ``mode`` into ``folder``; returns the ONNX file's path.

    The copy is patched as the second of two blocks (the first removes nothing and is never run), so it is
    entered with token sizes, as every block after the first merge is; without ``sized``, with none (no
    proportional-attention mask), as every block before it."""
    family = family_of(model)
    prefix = family.num_prefix(model)
    skeleton = _skeleton(model, [copy.deepcopy(family.blocks(model)[0]) for _ in range(2)])
    removed = 0 if mode == NONE else r
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch(skeleton, r=[0, removed], mode=["mean" if mode == NONE else mode] * 2, prop_attn=prop_attn,
              img_size=family.img_size(model))
    state = tofu_state(skeleton)
    state.plan = plan_tokens(tokens, prefix, [0, removed], warn=False)  # this graph's token count, not the model's
    path = Path(folder or tempfile.mkdtemp(prefix="tofu-block-")) / f"{mode}{'' if sized else '-unsized'}@{tokens}.onnx"
    block = _SizedBlock(skeleton, sized, family.block_inputs(model, tokens))
    _export(block, torch.zeros(1, tokens, family.embed_dim(model)), path, settings)
    return path


class _SizedBlock(nn.Module):
    """A patched two-block skeleton's second block as a graph ``[B, N, C] -> [B, N - r, C]``, entered with token
    sizes (all 1: the values do not change the work) or, without ``sized``, with none, and with what else the
    block takes (``inputs``: a rotary model's rotations, ``ModelFamily.block_inputs``)."""

    def __init__(self, skeleton: nn.Module, sized: bool = True, inputs: dict | None = None) -> None:
        super().__init__()
        self.skeleton, self.sized, self.inputs = skeleton, sized, dict(inputs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = tofu_state(self.skeleton)
        state.size = x[..., :1] * 0 + 1 if self.sized else None  # [B, N, 1], from x: the batch stays symbolic
        state.sample = state.rope = None
        return family_of(self.skeleton).blocks(self.skeleton)[1](x, **self.inputs)


def stem_graph(model: nn.Module, settings: ExportSettings | None = None, folder: Path | None = None) -> Path:
    """Export ``model`` without its blocks (``[B, 3, H, W]`` -> pooled output) into ``folder``; returns the path."""
    path = Path(folder or tempfile.mkdtemp(prefix="tofu-block-")) / "stem.onnx"
    _export(_skeleton(model, []), torch.zeros(1, 3, *family_of(model).img_size(model)), path, settings)
    return path


def _export(module: nn.Module, example: torch.Tensor, path: Path, settings: ExportSettings | None) -> None:
    settings = settings or ExportSettings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints: the shapes are constant on purpose
        settings.export(module.eval(), path, tuple(example.shape[-2:]), example=example)


def sample_token_counts(tokens0: int, num_prefix: int, r: int, depth: int, points: int = 3) -> list[int]:
    """Up to ``points`` token counts (ascending) spanning what the blocks of a uniform-``r`` model receive."""
    plan = plan_tokens(tokens0, num_prefix, [r] * depth, warn=False).tokens
    picks = {plan[round(k * (depth - 1) / max(points - 1, 1))] for k in range(points)}
    return sorted(picks)


def block_input(block_in: torch.Tensor, num_prefix: int, n: int) -> np.ndarray:
    """What the timed block is fed at ``n`` tokens: of ``block_in [B, N, C]`` (the input of the block the graphs
    are exported from, in the unreduced pass), the first image's prefix and ``n - num_prefix`` of its other tokens,
    evenly spread: ``[1, n, C]``."""
    x = block_in[:1]  # [1, N, C]
    rest = torch.linspace(num_prefix, int(x.shape[1]) - 1, n - num_prefix).round().long()  # [n - prefix]
    return torch.cat([x[:, :num_prefix], x[:, rest]], dim=1).numpy()


def measure_block_latency(
    model: nn.Module,
    r: int,
    block_in: torch.Tensor,
    image: torch.Tensor,
    *,
    provider: str = "cpu",
    threads: int | None = None,
    rounds: int = 40,
    points: int = 3,
    prop_attn: bool = True,
    settings: ExportSettings | None = None,
    clock: str = "wall",
    on_step: Callable[[], None] | None = None,
    on_timing: Callable[[], None] | None = None,
) -> BlockLatency:
    """Export (``settings``: the user's exporter, opset, simplification) and time the one-block graphs of the module
    docstring, fed ``block_input`` of ``block_in [B, N, C]`` (the first block's input in the unreduced pass:
    ``Trace.inputs[0]``) and the stem graph ``image [1, 3, H, W]``; ``on_step`` after each export (``1 + 5 *
    points`` of them, side by side in forked workers where cores allow: ``exporters.workers``) and round,
    ``on_timing`` once between the two. The graphs take tokens, not images, so they are opened by the engines'
    session factory (``engines.ort.create_session``) rather than the image runner."""
    family = family_of(model)
    threads = clock_threads(clock, threads)
    depth, prefix = family.depth(model), family.num_prefix(model)
    counts = sample_token_counts(num_tokens(model), prefix, r, depth, points)
    variants = {name: (mode, name != UNSIZED) for name, mode in ((NONE, NONE), (UNSIZED, NONE),
                                                                   *((m, m) for m in REDUCE_MODES))}
    with tempfile.TemporaryDirectory(prefix="tofu-calibrate-") as tmp:
        jobs = {"stem": partial(stem_graph, model, settings, Path(tmp))}
        jobs |= {f"{name}@{n}": partial(block_graph, model, mode, n, r, prop_attn, settings, Path(tmp), sized)
                 for n in counts for name, (mode, sized) in variants.items()}
        workers = (settings or ExportSettings()).workers_for(len(jobs), model)
        graphs = dict(zip(jobs, run_jobs(list(jobs.values()), workers, on_step), strict=True))  # side by side
        feeds = {"stem": image[:1].numpy()} | {f"{name}@{n}": block_input(block_in, prefix, n)
                                                for n in counts for name in variants}
        runners = {}
        for name, graph in graphs.items():
            session = create_session(graph, threads=threads, spinning=False, provider=provider)
            feed = {session.get_inputs()[0].name: feeds[name]}
            session.run(None, feed)
            runners[name] = lambda s=session, f=feed: s.run(None, f)
    if on_timing is not None:
        on_timing()
    samples = time_round_robin(runners, iters=rounds, clock=clock, on_round=on_step)

    def median_iqr(values: Sequence[float]) -> tuple[float, float]:
        q1, mid, q3 = np.percentile(values, [QUARTILES[0], 50.0, QUARTILES[1]])  # as every spread of the tool
        return mid, q3 - q1

    # A mode's block = the plain block + the median over rounds of (mode - plain) in the same round: pairing by
    # round cancels the load the two shared, which on a busy machine moves both by more than the difference.
    none = {n: median_iqr(samples[f"{NONE}@{n}"]) for n in counts}
    block_ms, spread = {NONE: [none[n][0] for n in counts]}, {NONE: [none[n][1] for n in counts]}
    for mode in (*REDUCE_MODES, UNSIZED):
        paired = [[a - b for a, b in zip(samples[f"{mode}@{n}"], samples[f"{NONE}@{n}"], strict=True)] for n in counts]
        block_ms[mode] = [none[n][0] + median_iqr(d)[0] for n, d in zip(counts, paired, strict=True)]
        spread[mode] = [median_iqr(d)[1] for d in paired]
    unsized = block_ms.pop(UNSIZED)
    per_token = [block_ms[NONE][k] * mlp_share(model, n) / n for k, n in enumerate(counts)]
    return BlockLatency(r, counts, block_ms, spread, median_iqr(samples["stem"])[0], rounds, f"onnxruntime-{provider}",
                        per_token, unsized)
