"""Efficient-attention methods, one module each, registered with :func:`bench_suite.registry.register_method`.

Importing this package imports no method: the registry finds every method, these included, through the
entry-point group ``bench_suite.methods`` (see ``pyproject.toml``), the same way as a plugin's.
"""
