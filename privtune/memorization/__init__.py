"""Memorization detection and mitigation: Wen et al. (ICLR 2024) text-conditional noise magnitude and
Ren et al. (ECCV 2024) cross-attention entropy, as training-time filters and sampling-time options.
The attacks built on them live in privtune.eval.attacks (wen.py, ren.py)."""
