"""Which of onnxscript's rewrite rules torch's graph optimiser applies to an export here.

torch's dynamo exporter ends with onnxscript's optimiser (``optimizer.optimize_ir``: constant folding, then the
default rewrite rules, twice over). One rule is left out:

- ``SlicesSplit`` rewrites two ``Slice`` nodes that halve a last axis into one ``Split`` (rotary embeddings). Its
  pattern has two output nodes, and onnxscript matches such a pattern by walking the whole graph for every candidate
  node, so its cost grows with the square of the graph: 70% of the optimiser's time on deit_small's ToFu graph
  (10.9-11.5 -> 3.4-3.7 CPU-s), 80% on ViT-L/16's (44.5-54.6 -> 9.0-9.3; ``bench/results/optimiser_rules.md``). It
  does not fire on torch's graphs, whose ``Slice`` nodes all carry a steps input that its pattern lacks: the graphs
  optimised without it are byte for byte the same (``tests/test_dynamo_optimiser.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

SKIPPED_RULES = ("SlicesSplit",)


@contextlib.contextmanager
def rewrite_rules_without(names: Sequence[str] = SKIPPED_RULES) -> Iterator[None]:
    """Within the block, onnxscript's graph optimiser applies its default rewrite rules but the ones named. Where
    onnxscript keeps its rules elsewhere, nothing changes. It swaps a module global: a process exports one graph at a
    time (no export here runs in a thread)."""
    try:
        from onnxscript import rewriter

        rules = rewriter._DEFAULT_REWRITE_RULES
    except (ImportError, AttributeError):
        yield
        return
    rewriter._DEFAULT_REWRITE_RULES = tuple(rule for rule in rules if getattr(rule, "name", None) not in names)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = rules
