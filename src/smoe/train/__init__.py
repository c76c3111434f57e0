"""Training: losses, optimizer and schedule, corpus batches, atomic checkpoints, the step and
the loop, plots, and sparse upcycling. ``smoe train`` / ``smoe export`` / ``smoe upcycle`` /
``smoe demo`` are thin wrappers over these."""

from smoe.train.config import TrainConfig
from smoe.train.losses import load_balancing_loss, router_z_loss
from smoe.train.step import NonFiniteLossError, forward_loss, train_step

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "forward_loss",
    "load_balancing_loss",
    "router_z_loss",
    "train_step",
]
