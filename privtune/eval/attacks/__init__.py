"""Membership-inference attacks; importing this package registers each one in `ATTACKS`."""

from . import clid, gsa, loss, miagm, pang_wang, pia, quantile, ren, rediffuse, secmi, structural, wen, wu
from .base import ATTACKS, REQUIREMENTS, Attack, AttackScores, AttackTarget, EncodedSamples, missing_requirements

__all__ = [
    "ATTACKS", "REQUIREMENTS", "Attack", "AttackScores", "AttackTarget", "EncodedSamples", "missing_requirements",
    "clid", "gsa", "loss", "miagm", "pang_wang", "pia", "quantile", "ren", "rediffuse", "secmi", "structural", "wen", "wu",
]
