"""bench_suite: an open benchmark of efficient-attention methods for Vision Transformers.

At the same MHSA FLOPs, which attention method keeps the most top-1 accuracy? See README.md.
"""
__version__ = "0.1.0"
