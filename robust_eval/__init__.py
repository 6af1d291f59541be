"""The robustness evaluation behind ``robustness.py``: its configuration, the jobs it plans, the
model as a classifier of pixels, the attacks and corruptions, the measuring and its results file.
"""
