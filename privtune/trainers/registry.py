"""The trainer registry: a new defense is one file plus one `@TRAINERS.register(name)` line."""

from ..registry import Registry

TRAINERS = Registry("trainer")


def get_trainer(name: str):
    return TRAINERS.get(name)
