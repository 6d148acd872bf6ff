"""Does block 0 stand for every block? calibrate's latency model times one-block graphs of the first block only.

``calibration.latency`` exports the model's first block (per mode, per token count) and feeds it the first block's
input in the unreduced pass; every block's latency is predicted from those. A block's time depends on its input's
values (``bench/results/latency_prediction.md``), so this script exports, per sampled block k, the same one-block
graphs from block k's own weights (``calibration.latency.block_graph`` on the model holding block k first) fed block
k's own input, and times them interleaved with block 0's graphs fed block 0's input (what the model uses) and fed
block k's input (weights and input mismatched, for contrast). Reported per block and mode: the median time over
the rounds and its ratio to block 0's graph of the same mode on block 0's input; the mean ratio over the sampled
blocks is how far a prediction from block 0 is off for a uniform policy.

Usage: python bench/block_weights.py --checkpoint <dinov2.safetensors> --data data/fashion-mnist
       [--blocks 0,3,6,9,11] [--modes none,mlerp,prune] [--r 16] [--rounds 150] [--out bench/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

from bench_record import header, machine_line, write_results

from tofu_export import load_model
from tofu_export.calibration.images import load_images
from tofu_export.calibration.latency import block_graph, block_input
from tofu_export.calibration.trace import trace
from tofu_export.engines.ort import create_session
from tofu_export.models.family import family_of
from tofu_export.profiling.compare import time_round_robin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="images: the unreduced pass giving every block's input")
    parser.add_argument("--blocks", default="0,3,6,9,11")
    parser.add_argument("--modes", default="none,mlerp,prune")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    load_before = os.getloadavg()[0]
    model = load_model(args.checkpoint).model.eval()
    family = family_of(model)
    tokens, prefix = family.num_tokens(model), family.num_prefix(model)
    blocks, modes = [int(k) for k in args.blocks.split(",")], args.modes.split(",")
    if blocks[0] != 0:
        blocks = [0, *blocks]
    images, _ = load_images(args.data, model, 8)
    inputs = trace(model, images, args.r).inputs  # [depth] x [8, N, C]
    feeds = {k: block_input(inputs[k], prefix, tokens) for k in blocks}  # [1, N, C] each
    runners = {}
    with tempfile.TemporaryDirectory(prefix="tofu-block-weights-") as tmp:
        for k in blocks:
            holder = family.with_blocks(model, [family.blocks(model)[k]])  # block k first: what block_graph exports
            for mode in modes:
                session = create_session(block_graph(holder, mode, tokens, args.r, folder=Path(tmp) / f"b{k}"),
                                         threads=1, spinning=False)
                name = session.get_inputs()[0].name
                fed = {"own": feeds[k]} | ({f"in{j}": feeds[j] for j in blocks if j} if k == 0 else {})
                for feed_name, x in fed.items():
                    feed = {name: x}
                    session.run(None, feed)
                    runners[(k, mode, feed_name)] = lambda s=session, f=feed: s.run(None, f)
        print(f"timing {len(runners)} graph and input pairs, {args.rounds} rounds", flush=True)
        samples = time_round_robin(runners, iters=args.rounds, clock="thread-cpu")
    median = {key: statistics.median(v) for key, v in samples.items()}
    rows = [{"block": k, "mode": mode, "fed": feed, "ms": ms, "vs_block0": ms / median[(0, mode, "own")]}
            for (k, mode, feed), ms in median.items()]
    own = [row for row in rows if row["fed"] == "own"]
    mean_ratio = {mode: statistics.mean(row["vs_block0"] for row in own if row["mode"] == mode) for mode in modes}
    command = " ".join(["python bench/block_weights.py", *sys.argv[1:]])
    machine = machine_line(load_before, f"onnxruntime {version('onnxruntime')}")
    lines = [*header("One block for all: block k's own one-block graph and input against block 0's", command, machine),
             f"{Path(args.checkpoint).name}: one-block graphs at {tokens} tokens (r={args.r} where the mode removes "
             f"tokens), dynamo exporter, opset 17, entered with token sizes; {args.rounds} interleaved rounds, one ORT "
             "intra-op thread, the calling thread's CPU time; inputs: each block's input in the unreduced pass of 8 "
             f"images of {args.data} (the first image).", "",
             "| block | weights | fed | mode | median ms | / block 0 on its own input |", "|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (x["fed"] != "own", x["block"], x["fed"], modes.index(x["mode"]))):
        fed = f"block {row['block']}'s input" if row["fed"] == "own" else f"block {row['fed'][2:]}'s input"
        lines.append(f"| {row['block']} | block {row['block']} | {fed} | {row['mode']} | {row['ms']:.3f} | "
                     f"{row['vs_block0']:.3f} |")
    lines += ["", f"Mean over blocks {', '.join(map(str, blocks))} of each block's own graph on its own input, / block "
              "0's (what a uniform policy's prediction from block 0 misses per block): "
              + ", ".join(f"{mode} {ratio:.3f}" for mode, ratio in mean_ratio.items()) + "."]
    write_results(args.out, "block_weights", lines, {"command": command, "machine": machine, "rows": rows,
                                                     "mean_ratio": mean_ratio})


if __name__ == "__main__":
    main()
