"""Training loops: :class:`Trainer`, its callbacks and results."""

from .callbacks import Callback, EarlyStopping
from .trainer import FitResult, Trainer

__all__ = ["Callback", "EarlyStopping", "FitResult", "Trainer"]
