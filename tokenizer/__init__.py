"""SSDD tokenizer: KL encoder + single-step diffusion decoder (arXiv 2510.04961), trained GAN-free.

Public API: `SSDD` (build, encode, decode, load released checkpoints). Training, eval and z_stats live in
`tokenizer.train` (`accelerate launch -m tokenizer.train ...`); the run machinery every part of the suite shares
(errors, configs, validation, atomic writes, checkpoints, run folders, training helpers) in `tokenizer.common`,
which imports no model code.

The names below are loaded on first use (PEP 562), so `import tokenizer.common.errors` does not build the models.
"""

import importlib

_EXPORTS = {
    "SSDD": "tokenizer.ssdd",
    "SSDDDecoder": "tokenizer.decoder",
    "DECODER_SIZES": "tokenizer.decoder",
    "Encoder": "tokenizer.encoder",
    "DiagonalGaussian": "tokenizer.encoder",
    "build_encoder": "tokenizer.encoder",
    "UserError": "tokenizer.common.errors",
    "CheckpointMismatchError": "tokenizer.common.errors",
    "WeightsUnavailableError": "tokenizer.common.errors",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tokenizer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
