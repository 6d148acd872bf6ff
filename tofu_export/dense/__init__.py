"""Token Fusion for dense outputs (diffusion denoisers): reduce before a sub-layer, unmerge after.

``windows`` picks destinations (one per s x s window), ``tofu`` matches, reduces and unmerges (pure functions),
``module`` holds one block's frozen reduction as an ``nn.Module``, ``plan`` decides which blocks reduce and how.
"""
