"""The Sparsifiner paper (Wei et al., CVPR 2023) reproduced by the suite: ``python -m bench_suite tables``
and ``visualize``.

This subpackage is the one place that knows the paper's tables, rows and figures (and so the names of the
methods in them); the framework around it names no method. Modules: :mod:`.data` (the paper's numbers,
``bench_suite/data/paper_results.csv``, validated; the configurations of each table), :mod:`.counts` (MHSA
FLOPs of those configurations at paper scale, in worker processes), :mod:`.tables` (assembly of a table
beside the paper's numbers, and its Markdown, CSV and LaTeX), :mod:`.figures` (Figures 3-7),
:mod:`.page` (the HTML/Markdown report page), :mod:`.run` (the whole ``tables`` command) and
:mod:`.visualize` (attention maps of a trained model).
"""
