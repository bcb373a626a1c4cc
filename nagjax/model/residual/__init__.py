"""Residual schemes by name: one file per scheme, one `register` line each (see `base.py`)."""

from __future__ import annotations

from nagjax.model.residual.base import (SCHEMES, MicroscopeStat, ParamGroup, Scheme, StepContext, all_param_groups,
                                        get_scheme, register, unregister)
from nagjax.model.residual.attnres import ATTNRES
from nagjax.model.residual.nag import NAG
from nagjax.model.residual.prenorm import LNS, PRENORM

register(PRENORM)
register(LNS)
register(NAG)
register(ATTNRES)

__all__ = ["SCHEMES", "MicroscopeStat", "ParamGroup", "Scheme", "StepContext", "all_param_groups", "get_scheme", "register",
           "unregister"]
