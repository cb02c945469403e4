"""SSDD tokenizer: KL encoder + single-step diffusion decoder (arXiv 2510.04961), trained GAN-free.

Public API: `SSDD` (build, encode, decode, load released checkpoints). Training, eval and z_stats live in
`tokenizer.train` (`accelerate launch -m tokenizer.train ...`).
"""

from tokenizer.decoder import DECODER_SIZES, SSDDDecoder
from tokenizer.encoder import DiagonalGaussian, Encoder, build_encoder
from tokenizer.errors import CheckpointMismatchError, UserError, WeightsUnavailableError
from tokenizer.ssdd import SSDD

__all__ = ["SSDD", "SSDDDecoder", "DECODER_SIZES", "Encoder", "DiagonalGaussian", "build_encoder",
           "UserError", "CheckpointMismatchError", "WeightsUnavailableError"]
