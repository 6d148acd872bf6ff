"""Resumable sweeps over (mode, r): the state file (``state``) and the export-time-score job (``job``)."""
