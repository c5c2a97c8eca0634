"""Efficient-attention methods, each a LightningModule registered with
:func:`bench_suite.registry.register_method`. Importing this package registers the built-in ones."""
from methods import full  # noqa: F401  (registers "full")
from methods import evit  # noqa: F401  (registers "evit")
from methods import sparsifiner  # noqa: F401  (registers "sparsifiner", "sparsif_evit")
from methods import dynamicvit, linformer  # noqa: F401
from methods.base import BenchModule, ForwardOutput, check_keep_rate


def _register_kernels() -> None:
    """Offer the fused C++ CPU kernels as Sparsifiner's ``attention_impl="cpp"`` (built on first use)."""
    from bench_suite.kernels import register

    register()


_register_kernels()

__all__ = ["BenchModule", "ForwardOutput", "check_keep_rate"]
