"""Model adapters: one model family a file. Each exposes ``patch`` / ``unpatch`` for its architecture."""
