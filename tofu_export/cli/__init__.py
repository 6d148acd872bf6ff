"""The ``tofu-export`` command line: a thin layer of option groups over one library function per command.

``app.py`` assembles the commands (one file each), ``options.py`` holds the option groups they share,
``errors.py`` maps every error to its exit code.
"""

from tofu_export.cli.app import app, main

__all__ = ["app", "main"]
