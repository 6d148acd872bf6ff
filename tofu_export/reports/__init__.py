"""Reports a person reads: profile tables (Markdown/JSON), the sweep table, latency and Pareto plots."""
