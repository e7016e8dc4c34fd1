"""Benchmarks of the agent execution registry against a bare trio baseline and peer stacks.

Entry point: ``python -m benchmarks.run [--smoke]``. Results go to ``benchmarks/results/`` and
``benchmarks/REPORT.md``. Server and load generator always run as separate processes.
"""
