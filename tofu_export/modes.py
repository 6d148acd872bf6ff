"""The reduction modes a user picks: plain names, no torch, so the command line checks them before loading torch.

``tofu`` prunes in the first ``--prune-layers`` blocks and merges with MLERP after them; ``tome`` (size-weighted mean),
``prune`` and ``mlerp`` use one reduce mode in every block. ``schedule.layer_modes`` expands a mode per block.
"""

from __future__ import annotations

MODES: tuple[str, ...] = ("tofu", "tome", "prune", "mlerp")
