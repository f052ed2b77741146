"""Membership-inference attacks; importing this package registers each one in `ATTACKS`."""

from . import loss, pia, ren, secmi, wen
from .base import ATTACKS, Attack, AttackScores, AttackTarget, EncodedSamples

__all__ = ["ATTACKS", "Attack", "AttackScores", "AttackTarget", "EncodedSamples", "loss", "pia", "ren", "secmi", "wen"]
