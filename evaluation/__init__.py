"""Offline evaluation of streamrec against baselines: splits, protocols, baselines, reports.

``streamrec eval`` (see :mod:`evaluation.cli`) is the entry point; the metrics themselves are pure
functions in :mod:`models.metrics`.
"""
