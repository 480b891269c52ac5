"""Training loops: :class:`Trainer`, its callbacks and results."""

from .callbacks import Callback, EarlyStopping
from .multitask import MultiTaskModel, MultiTaskTrainer, Task
from .trainer import FitResult, Trainer

__all__ = ["Callback", "EarlyStopping", "FitResult", "MultiTaskModel", "MultiTaskTrainer", "Task", "Trainer"]
