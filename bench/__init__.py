"""Evaluation harness of the denoising project (held-out split, pairs, baselines, harness, CLI).

Run as ``python bench/run_benchmark.py ...`` from the repository root. Training code should call
:func:`bench.heldout.assert_not_heldout` on every file it reads.
"""
