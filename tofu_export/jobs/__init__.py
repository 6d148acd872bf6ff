"""Multi-step jobs behind the CLI commands (sweep, eval, demo): thin glue over the library."""
