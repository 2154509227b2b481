"""Evaluation harness of the denoising project (pairs, baselines, learned models, isolated runs,
scoring, report, the run and its command line).

Run as ``python bench/run_benchmark.py ...`` from the repository root. Training code should call
:func:`lib.data.heldout.assert_not_heldout` on every file it reads.
"""
