"""Full (dense) attention: the baseline and the teacher of every method."""
from __future__ import annotations

from torch import nn

from bench_suite.registry import register_method
from methods.base import BenchModule


@register_method("full", keep_rates=(1.0,), description="dense MHSA baseline (timm's attention, unchanged)")
class FullAttention(BenchModule):
    """Dense multi-head self-attention, timm's ``Attention`` unchanged (Vaswani et al., 2017).

    Fine-tuned with the same recipe and budget as every other method, so that its row separates the
    effect of the extra fine-tuning from the effect of the method.

    Raises:
        ValueError: for any keep rate other than 1.0 (dense attention keeps everything).
    """

    reference = True  # the dense baseline: the teacher's evaluation and the speed ratios refer to it
    in_default_run = True
    display_name = "Full attention"
    plot_color, plot_marker = "#0173b2", "o"

    def __init__(self, backbone: nn.Module, keep_rate: float = 1.0, teacher: nn.Module | None = None,
                 **kwargs) -> None:
        if keep_rate != 1.0:
            raise ValueError(f"full attention has no keep rate to set (got {keep_rate}); use 1.0")
        super().__init__(backbone, keep_rate=keep_rate, teacher=teacher, **kwargs)
