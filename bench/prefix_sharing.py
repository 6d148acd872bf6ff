"""Would a prefix cache pay? How much of a floor search's block work repeats a prefix an earlier candidate ran.

A fidelity floor's search (``calibration.floor``) runs each candidate from block 0 on the search images. Two
candidates with the same modes and r in their first k blocks compute the same tokens (and sizes) up to block k, so
a cache of the block-boundary states of the last few candidates could start a candidate where it parts from them.
This script reads a ``policy.json`` written by ``calibrate --min-cosine`` (its ``measurements.candidates``, in the
order they ran) and reports, per cache size (how many earlier candidates' states are kept), the share of the
search's block work such a cache would skip. A block's work is priced by the policy's own latency model: the
unreduced block's time at the tokens entering it (``measurements.latency.block_ms.none``, linear between the
measured token counts). The confirm images' forwards run on other images, so no search state serves them; they
are left out. A candidate the floor's early stop cut short (``images_run``) counts the images it ran. Nothing is
run: this is arithmetic on the recorded order.

Usage: python bench/prefix_sharing.py --policy policy.json [--sizes 1,2,4,8,16,0] [--out bench/results/x]
(size 0: every earlier candidate kept).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from bench_record import write_results

from tofu_export.calibration.latency_model import interpolate_linear
from tofu_export.schedule import plan_tokens

Step = tuple[str, int]  # one block of a candidate: (mode or "-" where it removes nothing, r)


def steps(candidate: dict) -> list[Step]:
    return [(m if k else "-", k) for m, k in zip(candidate["modes"], candidate["r"], strict=True)]


def shared_blocks(a: Sequence[Step], b: Sequence[Step]) -> int:
    """How many leading blocks two candidates run alike."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def skipped_share(candidates: Sequence[dict], costs: Sequence[Sequence[float]], size: int, images: int) -> float:
    """The share of the candidates' block work (``costs``: per candidate, per block and image) a cache of the last
    ``size`` candidates' states (0: all) skips. A floor's certain miss ran ``images_run`` of the ``images`` search
    images (``calibration.floor``): its work counts those, and a state kept from an earlier candidate serves as many
    images as both ran (the images' order is not recorded: as if both ran the same ones, the most it can serve)."""
    total = skipped = 0.0
    for i, (c, block) in enumerate(zip(candidates, costs, strict=True)):
        kept = candidates[:i] if size == 0 else candidates[max(0, i - size):i]
        ran = c.get("images_run", images)
        served = [(shared_blocks(steps(c), steps(p)), min(ran, p.get("images_run", images))) for p in kept]
        total += sum(block) * ran
        skipped += max((sum(block[:k]) * n for k, n in served), default=0.0)
    return skipped / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", type=Path, required=True)
    parser.add_argument("--sizes", default="1,2,4,8,16,0")
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix_sharing"))
    args = parser.parse_args()
    data = json.loads(args.policy.read_text())
    m = data["measurements"]
    candidates, latency = m["candidates"], m["latency"]
    model = data["model"]
    entering = [plan_tokens(model["tokens"], model["num_prefix"], c["r"], warn=False).tokens for c in candidates]
    costs = [[interpolate_linear(latency["tokens"], latency["block_ms"]["none"], n) for n in e] for e in entering]
    sizes = [int(x) for x in args.sizes.split(",")]
    images = data["source"]["images"]["count"] - data["source"]["images"].get("held_out", 0)
    shares = {size: skipped_share(candidates, costs, size, images) for size in sizes}
    token_rows = sum(sum(e) for e in entering) / len(entering)  # tokens held at the block boundaries, a candidate
    state_mb = images * model["embed_dim"] * 4 * token_rows / 2**20  # float32
    command = shlex.join(["python", "bench/prefix_sharing.py", *sys.argv[1:]])
    lines = ["# A prefix cache for the floor search's forwards: the block work it would skip", "",
             f"Command: `{command}` (arithmetic on the recorded order; nothing run).", "",
             f"The policy: {data['source'].get('budget')}, {len(candidates)} search candidates in "
             f"{1 + max(c.get('round', 0) for c in candidates)} rounds, a calibration of "
             f"{data['source'].get('seconds')} s. One kept candidate's block-boundary states on the {images} "
             f"search images: {state_mb:.0f} MiB on average (float32 tokens).", "",
             "| earlier candidates kept | share of the search's block work skipped |", "|---|---|"]
    lines += [f"| {'all' if size == 0 else size} | {share:.1%} |" for size, share in shares.items()]
    record = {"command": command, "policy": str(args.policy), "candidates": len(candidates), "state_mib": state_mb,
              "skipped_share": {str(size): share for size, share in shares.items()}}
    write_results(args.out, "prefix_sharing", lines, record)


if __name__ == "__main__":
    main()
