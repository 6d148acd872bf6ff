"""Token Fusion for dense outputs (diffusion denoisers): reduce before a sub-layer, unmerge after.

``windows`` picks destinations (one per s x s window), ``tofu`` matches, reduces and unmerges (pure functions),
``module`` holds one block's frozen reduction as an ``nn.Module``, ``plan`` decides which blocks reduce and how,
``export`` writes one static step, ``calibrate`` chooses per-block modes on final samples (``metrics``: PSNR, SSIM),
``measured`` times a policy's exported step, ``job`` is the library behind the commands. Nothing here knows a model:
models come through ``tofu_export.models.denoiser_family``.
"""
