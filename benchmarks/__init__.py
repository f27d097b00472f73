"""Benchmarks for unionfs: the same workloads, in the same run, on the native filesystem, the kernel's
overlayfs, fuse-overlayfs and unionfs.

Entry points: ``python -m benchmarks.run`` (measure, write JSON under ``benchmarks/out/``) and
``python -m benchmarks.report`` (Markdown table, ratios and plots from one JSON file).
"""
