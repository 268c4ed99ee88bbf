"""Triton kernels of ehm_fast, installed as `ehm_fast.kernels`.

Each module holds one op family; the functions exported here have the names and signatures of
ehm_fast._C's, so `ehm_fast._backend.kernels_for("triton")` can stand in for the extension.
"""

from .batch_norm import bn_act_bwd_dx, bn_act_bwd_sums, bn_act_fwd, bn_stats
from .bias_act import bias_act_bwd, bias_act_fwd
from .conv import conv_dgrad, conv_fwd, conv_wgrad
from .likelihood import code_nll_bwd, code_nll_fwd, image_nll_bwd, image_nll_fwd
from .log_partition import log_partition_bwd, log_partition_fwd
from .optim import cv_adam_, cv_sgd_, optim_chunk_size
from .vamp import vamp_bwd, vamp_fwd

__all__ = [
    "log_partition_fwd",
    "log_partition_bwd",
    "image_nll_fwd",
    "image_nll_bwd",
    "code_nll_fwd",
    "code_nll_bwd",
    "vamp_fwd",
    "vamp_bwd",
    "bias_act_fwd",
    "bias_act_bwd",
    "bn_stats",
    "bn_act_fwd",
    "bn_act_bwd_sums",
    "bn_act_bwd_dx",
    "conv_fwd",
    "conv_dgrad",
    "conv_wgrad",
    "cv_adam_",
    "cv_sgd_",
    "optim_chunk_size",
]
