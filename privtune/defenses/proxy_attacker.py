"""The proxy membership-inference attacker of MP-LoRA / SMP-LoRA (Luo et al., AAAI 2025, arXiv 2402.11989;
spec: defenses.md section 1).

An MLP on the flattened per-element noise-prediction error of one sample (input = latent C*H*W),
`in -> 512 -> 256 -> 2` with ReLU and dropout 0.5 after each hidden layer; class 1 = member. It is trained
only during fine-tuning, against the LoRA; the evaluation stage never uses it (it fits fresh attackers).
"""

from __future__ import annotations

import torch
from torch import nn


class ProxyAttacker(nn.Module):
    """2-way membership classifier on a loss map [B, C, H, W] (flattened)."""

    def __init__(self, in_features: int, hidden=(512, 256), dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(h)
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features

    def forward(self, loss_map: torch.Tensor) -> torch.Tensor:
        return self.net(loss_map.flatten(1).float())


def build_attacker(in_features: int, hidden, dropout: float, seed: int) -> ProxyAttacker:
    """The attacker with weights drawn from `seed` alone (identical on every process and on resume)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ProxyAttacker(in_features, tuple(hidden), dropout)


class AttackerState:
    """Checkpointed with accelerate: the attacker's weights, its optimizer and the per-step history."""

    COLUMNS = ("step", "accuracy", "gain", "member_ce", "l_ada", "loss")

    def __init__(self, attacker: ProxyAttacker, optimizer: torch.optim.Optimizer):
        self.attacker = attacker
        self.optimizer = optimizer
        self.history: list[tuple[float, ...]] = []

    def state_dict(self) -> dict:
        history = torch.tensor(self.history, dtype=torch.float64).reshape(-1, len(self.COLUMNS))
        return {"attacker": self.attacker.state_dict(), "optimizer": self.optimizer.state_dict(), "history": history}

    def load_state_dict(self, state: dict) -> None:
        self.attacker.load_state_dict(state["attacker"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = [tuple(row) for row in state["history"].tolist()]
