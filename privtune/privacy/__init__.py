"""Differential-privacy accounting shared by the private trainers."""

from .accounting import ACCOUNTANTS, MAX_NOISE_MULTIPLIER, Budget, epsilon_spent, make_accountant, plan_budget

__all__ = ["ACCOUNTANTS", "MAX_NOISE_MULTIPLIER", "Budget", "epsilon_spent", "make_accountant", "plan_budget"]
