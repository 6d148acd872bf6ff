"""Fine-tuning with ToFu in the loop: a checkpoint tuned to run with its token reduction (``finetune.job``), by
self-distillation towards the unreduced model (``finetune.distill``), its loss plotted (``finetune.plot``)."""
