"""Is ``Sqrt(ReduceSum(x * x))`` faster than ``ReduceL2`` in ToFu's graph on ONNX Runtime CPU? (issue 23)

MLERP's norms and the matching's key normalisation are ``ReduceL2`` nodes (48 in deit_small's ToFu graph, 0.93 ms
of its kernels in ORT's profile). On one ``[1, N, C]`` token block ORT's ``ReduceL2`` kernel runs several times
slower than a ``Mul``, a ``ReduceSum`` and a ``Sqrt``, the three layers TensorRT's importer writes for it anyway.
This script measures both: the ops alone, and the whole deit_small ToFu graph (dynamo exporter, r = 16, random
weights) against the same graph with every ``ReduceL2`` written out, on one intra-op thread, each timed run by the
calling thread's CPU time, interleaved in shuffled order (``profiling.compare.time_round_robin``), in
``--repeats`` rounds of fresh sessions. The paired ratio is the median over iterations of written-out / ReduceL2.

A third form, ``Sqrt(ReduceSumSquare(x))``, is timed on the op alone; and MLERP's whole rescale (norm, clamp,
divide, multiply: 6 nodes) against ONNX's one-node ``LpNormalization`` and a ``Mul``.

Usage: python bench/norm_form.py [--iters 100] [--repeats 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_deit_small import build_variants

from tofu_export.engines.ort import create_session
from tofu_export.exporters import dynamo
from tofu_export.profiling.compare import time_round_robin
from tofu_export.profiling.device import describe_device

TOKENS, WIDTH = 181, 384  # deit_small's kept rows after the first reduction, its width


def write_out_reduce_l2(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with every ``ReduceL2`` replaced by ``Sqrt(ReduceSum(Mul(x, x)))``; the count replaced."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, nodes, count = model.graph, [], 0
    for node in graph.node:
        if node.op_type != "ReduceL2":
            nodes.append(node)
            continue
        keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is not None:  # opset < 18: an attribute; ReduceSum (opset >= 13) takes it as an input
            axes_name = f"{node.output[0]}__axes"
            graph.initializer.append(helper.make_tensor(axes_name, TensorProto.INT64, [len(axes)], axes))
        else:
            axes_name = node.input[1]
        square, total = f"{node.output[0]}__square", f"{node.output[0]}__sum"
        nodes += [helper.make_node("Mul", [node.input[0]] * 2, [square], name=f"{node.name}/Mul"),
                  helper.make_node("ReduceSum", [square, axes_name], [total], name=f"{node.name}/ReduceSum",
                                   keepdims=keepdims),
                  helper.make_node("Sqrt", [total], list(node.output), name=f"{node.name}/Sqrt")]
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model, count


def thread_cpu_latency_ms(models: dict[str, Path], *, warmup: int, iters: int, seed: int) -> dict[str, list[float]]:
    """Per graph, ``iters`` times (ms) on one intra-op thread by the calling thread's CPU clock, interleaved, each
    graph fed seeded normal noise of its inputs' shapes at batch 1 (the op graphs take token blocks, not an image:
    no image runner)."""
    runs = {}
    for name, path in models.items():
        session = create_session(path, threads=1, spinning=False)
        rng = np.random.default_rng(seed)
        inputs = {i.name: rng.standard_normal([1, *(int(d) for d in i.shape[1:])], dtype=np.float32)
                  for i in session.get_inputs()}
        for _ in range(warmup):
            session.run(None, inputs)
        runs[name] = lambda s=session, f=inputs: s.run(None, f)
    return time_round_robin(runs, iters=iters, seed=seed, clock="thread-cpu")


@contextlib.contextmanager
def norms_as_reduce_l2() -> Iterator[None]:
    """Export 2-norms as torch's translation does (``ReduceL2``), not written out as ``tofu-export`` does now."""
    table = dynamo.translation_table

    def without_norm(opset: int) -> dict:
        return {op: fn for op, fn in table(opset).items() if fn is not dynamo._vector_norm}

    dynamo.translation_table = without_norm
    try:
        yield
    finally:
        dynamo.translation_table = table


def one_norm(opset: int = 17) -> onnx.ModelProto:
    """``ReduceL2`` over the last axis of a ``[1, TOKENS, WIDTH]`` block, keepdims (MLERP's per-token norm)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, 1])
    node = helper.make_node("ReduceL2", ["x"], ["y"], name="norm", axes=[-1], keepdims=1)
    graph = helper.make_graph([node], "norm", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def sum_square_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """``one_norm`` as ``Sqrt(ReduceSumSquare(x))``: the square fused into the reduction (no [1, N, C] temporary)."""
    x, y = model.graph.input[0], model.graph.output[0]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [-1])
    nodes = [helper.make_node("ReduceSumSquare", ["x", "axes"], ["total"], name="norm/ReduceSumSquare", keepdims=1),
             helper.make_node("Sqrt", ["total"], ["y"], name="norm/Sqrt")]
    graph = helper.make_graph(nodes, "norm", [x], [y], [axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])  # axes as an input from opset 18


def rescale_forms() -> dict[str, onnx.ModelProto]:
    """MLERP's rescale of ``[1, TOKENS, WIDTH]`` rows to norms ``n [1, TOKENS, 1]``, two ways: as the graph writes it
    (``x * (n / max(Sqrt(ReduceSum(x * x)), eps))``, 6 nodes) and with ONNX's ``LpNormalization`` (``x / ||x||`` in
    one node, then ``* n``; no epsilon)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, TOKENS, WIDTH])
    n = helper.make_tensor_value_info("n", TensorProto.FLOAT, [1, TOKENS, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, TOKENS, WIDTH])
    constants = [helper.make_tensor("axes", TensorProto.INT64, [1], [-1]),
                 helper.make_tensor("eps", TensorProto.FLOAT, [], [1e-6])]
    written = [helper.make_node("Mul", ["x", "x"], ["square"]),
               helper.make_node("ReduceSum", ["square", "axes"], ["total"], keepdims=1),
               helper.make_node("Sqrt", ["total"], ["norm"]), helper.make_node("Max", ["norm", "eps"], ["clamped"]),
               helper.make_node("Div", ["n", "clamped"], ["factor"]), helper.make_node("Mul", ["x", "factor"], ["y"])]
    lp = [helper.make_node("LpNormalization", ["x"], ["unit"], axis=-1, p=2),
          helper.make_node("Mul", ["unit", "n"], ["y"])]
    return {name: helper.make_model(helper.make_graph(nodes, name, [x, n], [y], constants if name == "written_out"
                                                      else []), opset_imports=[helper.make_opsetid("", 17)])
            for name, nodes in (("written_out", written), ("lp_normalization", lp))}


def paired(rounds: list[dict[str, list[float]]], a: str, b: str) -> dict:
    """Median over timed iterations of ``a``'s time / ``b``'s in the same iteration, with a bootstrap interval."""
    per_round = [[x / y for x, y in zip(one[a], one[b], strict=True)] for one in rounds]
    ratios = [ratio for one in per_round for ratio in one]
    rng = np.random.default_rng(0)
    boot = [float(np.median(rng.choice(ratios, len(ratios)))) for _ in range(2000)]
    return {"median": round(statistics.median(ratios), 4),
            "ci95": [round(float(np.percentile(boot, q)), 4) for q in (2.5, 97.5)],
            "per_round": [round(statistics.median(one), 4) for one in per_round], "pairs": len(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    load_before = os.getloadavg()
    result: dict = {"command": f"python bench/norm_form.py --iters {args.iters} --repeats {args.repeats}"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        norm = one_norm()
        onnx.save(norm, folder / "op-reduce_l2.onnx")
        onnx.save(write_out_reduce_l2(norm)[0], folder / "op-written_out.onnx")
        onnx.save(sum_square_form(norm), folder / "op-sum_square.onnx")
        for name, model in rescale_forms().items():
            onnx.save(model, folder / f"rescale-{name}.onnx")
        with norms_as_reduce_l2():
            graph_path = build_variants(16, folder, {"tofu-dynamo"})["tofu-dynamo"][0]
        written, count = write_out_reduce_l2(onnx.load(str(graph_path)))
        onnx.save(written, folder / "tofu-dynamo-written_out.onnx")
        parts = {
            "op": {"reduce_l2": folder / "op-reduce_l2.onnx", "written_out": folder / "op-written_out.onnx",
                   "sum_square": folder / "op-sum_square.onnx"},
            "graph": {"reduce_l2": graph_path, "written_out": folder / "tofu-dynamo-written_out.onnx"},
            "rescale": {name: folder / f"rescale-{name}.onnx" for name in ("written_out", "lp_normalization")},
        }
        ratios = {"op": [("written_out", "reduce_l2"), ("sum_square", "reduce_l2")],
                  "graph": [("written_out", "reduce_l2")], "rescale": [("lp_normalization", "written_out")]}
        for part, models in parts.items():
            iters = args.iters * (1 if part == "graph" else 20)  # an op alone takes microseconds
            rounds = [thread_cpu_latency_ms(models, warmup=10, iters=iters, seed=seed) for seed in range(args.repeats)]
            result[part] = {name: round(statistics.median(t for one in rounds for t in one[name]), 4)
                            for name in models}
            result[part] |= {f"{a}_over_{b}": paired(rounds, a, b) for a, b in ratios[part]}
    result.update(replaced=count, load_average_before_after=[load_before, os.getloadavg()],
                  machine=describe_device().to_dict(), python=platform.python_version(),
                  onnxruntime=__import__("onnxruntime").__version__)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "norm_form.json").write_text(json.dumps(result, indent=2) + "\n")
    op, graph, machine = result["op"], result["graph"], result["machine"]
    lines = [
        "# ReduceL2 or Sqrt(ReduceSum(x * x)) on ONNX Runtime CPU (issue 23)", "",
        f"Command: `{result['command']}`. Machine: {machine['cpu_model']}, {machine['cpu_cores']} cores, "
        f"{machine['platform']}, Python {result['python']}, onnxruntime {result['onnxruntime']}; load average before "
        f"/ after: {' / '.join(' '.join(f'{x:.2f}' for x in load) for load in result['load_average_before_after'])}. "
        "One intra-op thread, each timed run by the calling thread's CPU time, interleaved in shuffled order, each "
        "after an untimed run of the same graph; the graph's 2-norms exported as torch's translation writes them "
        "(ReduceL2), then written out.", "",
        "| what | ReduceL2 ms | written out ms | written out / ReduceL2, paired median | 95% bootstrap | per round |",
        "|---|---|---|---|---|---|",
    ]
    for label, part in ((f"one norm of [1, {TOKENS}, {WIDTH}]", op),
                        (f"deit_small ToFu r=16, dynamo ({count} ReduceL2 written out)", graph)):
        ratio = part["written_out_over_reduce_l2"]
        lines.append(f"| {label} | {part['reduce_l2']:.4f} | {part['written_out']:.4f} | {ratio['median']} | "
                     f"{ratio['ci95'][0]}-{ratio['ci95'][1]} | {', '.join(map(str, ratio['per_round']))} |")
    square, written = op["sum_square_over_reduce_l2"], op["written_out_over_reduce_l2"]
    faster = square["ci95"][1] < written["ci95"][0]
    verdict = ("faster than the written-out form: worth writing the graph's norms this way" if faster
               else "not faster than the written-out form, which the graph keeps")
    lines += ["", f"The third form, `Sqrt(ReduceSumSquare(x))` (the square fused into the reduction), on the op alone: "
              f"{op['sum_square']:.4f} ms, {square['median']} of ReduceL2's time (paired; 95% bootstrap "
              f"{square['ci95'][0]}-{square['ci95'][1]}): {verdict}."]
    rescale = result["rescale"]
    lp = rescale["lp_normalization_over_written_out"]
    lines += ["", f"MLERP's rescale of [1, {TOKENS}, {WIDTH}] rows to given norms, written out as the graph has it (6 "
              f"nodes) {rescale['written_out']:.4f} ms, with ONNX's one-node `LpNormalization` then a `Mul` "
              f"{rescale['lp_normalization']:.4f} ms: {lp['median']} of the written-out time (paired; 95% bootstrap "
              f"{lp['ci95'][0]}-{lp['ci95'][1]})."]
    (args.out / "norm_form.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
