"""Evaluation stage: membership-inference attacks on a fine-tuned target, and their metrics."""
