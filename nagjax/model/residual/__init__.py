"""Residual schemes by name. One file per scheme; see `base.py` for the interface."""

from __future__ import annotations

import functools

from nagjax.model.residual.attnres import AttnResResidual, AttnResStream
from nagjax.model.residual.nag import NagResidual, NagStream
from nagjax.model.residual.prenorm import PreNormResidual, PreNormStream

# name -> (Stream class, BlockResidual factory(cfg, block_index, rngs=...))
SCHEMES = {
    "prenorm": (PreNormStream, functools.partial(PreNormResidual, layernorm_scaling=False)),
    "lns": (PreNormStream, functools.partial(PreNormResidual, layernorm_scaling=True)),
    "nag": (NagStream, NagResidual),
    "attnres": (AttnResStream, AttnResResidual),
}


def get_scheme(name: str):
    if name not in SCHEMES:
        raise ValueError(f"model.residual: unknown scheme {name!r}; expected one of {sorted(SCHEMES)}")
    return SCHEMES[name]
