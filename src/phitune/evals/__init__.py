"""Evaluation of a run: ``phitune eval`` (evaluate.py), generation-based scores of base vs tuned (generation.py),
and the HTML report (report.py).
"""
