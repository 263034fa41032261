"""Tasks by name: a plain dict, as ``rsiseg.models.registry.MODELS`` is for models.

See :mod:`rsiseg.tasks.base` for what a task is. Importing this package imports every task's
data and evaluation modules, so the command line imports it only where a task is needed.
"""

from __future__ import annotations

from rsiseg.tasks.base import Task, TaskDataset
from rsiseg.tasks.instance import InstanceTask
from rsiseg.tasks.prompted import PromptedTask
from rsiseg.tasks.semantic import SemanticTask

TASKS: dict[str, Task] = {"instance": InstanceTask(), "semantic": SemanticTask(), "prompted": PromptedTask()}

__all__ = ["TASKS", "Task", "TaskDataset", "get_task"]


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: unknown name, listing the registered ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(sorted(TASKS))}")
    return TASKS[name]
