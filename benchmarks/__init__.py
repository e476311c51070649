"""Benchmarks of gradscope, each runnable as ``python -m benchmarks.<name>`` from the repository root.

``python -m benchmarks.detection`` measures the detectors on the scenario suite in
:mod:`benchmarks.scenarios`.
"""
