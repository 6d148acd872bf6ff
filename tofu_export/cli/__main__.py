"""``python -m tofu_export.cli``: the same as the ``tofu-export`` command."""

from tofu_export.cli import main

main()
