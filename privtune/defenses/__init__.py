"""Building blocks that defenses share (e.g. the proxy membership attacker of MP-LoRA / SMP-LoRA)."""
