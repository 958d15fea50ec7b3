"""Tasks: what differs between kinds of model, behind one interface the engine calls.

    >>> from cnnlab.engine.tasks import get_task, task_names
    >>> task_names()
    ['classification', 'detection', 'reconstruction', 'segmentation']
    >>> get_task("reconstruction", loss="bce").loss_name
    'bce'

A model's registry entry names its task (``register_model(..., task="reconstruction")``);
``cnnlab train --model NAME`` uses that task. See docs/tasks.md to add one.
"""
from __future__ import annotations

from typing import Any

from cnnlab._errors import CnnlabError, did_you_mean
from cnnlab.engine.tasks.base import LossMeter, Meter, StepOutput, Task, TaskResult
from cnnlab.engine.tasks.classification import ClassificationTask
from cnnlab.engine.tasks.detection import DetectionTask
from cnnlab.engine.tasks.reconstruction import ReconstructionTask
from cnnlab.engine.tasks.segmentation import SegmentationTask

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Make a Task subclass available under ``cls.name`` (a duplicate name is an error)."""
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise CnnlabError(f"task {cls.name!r} is registered twice")
    _TASKS[cls.name] = cls
    return cls


register_task(ClassificationTask)
register_task(ReconstructionTask)
register_task(DetectionTask)
register_task(SegmentationTask)


def _register_report_sections() -> None:
    from cnnlab.engine.html_report import register_report_sections
    from cnnlab.engine.tasks import detection, reconstruction, segmentation

    register_report_sections(ReconstructionTask.name, reconstruction.report_sections, replace=True)
    register_report_sections(DetectionTask.name, detection.report_sections, replace=True)
    register_report_sections(SegmentationTask.name, segmentation.report_sections, replace=True)


_register_report_sections()


def task_names() -> list[str]:
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    if name not in _TASKS:
        raise CnnlabError(f"unknown task {name!r}{did_you_mean(name, _TASKS)}; tasks: {', '.join(task_names())}")
    return _TASKS[name]


def get_task(config_or_name: Any, *, loss: str = "auto") -> Task:
    """The Task for a TrainConfig (its model's registry task, checked against ``config.task``), or by name."""
    if isinstance(config_or_name, str):
        return task_class(config_or_name)(loss)
    from cnnlab.models import model_info

    config = config_or_name
    registered = model_info(config.model.name).task
    if config.task not in ("auto", registered):
        task_class(config.task)  # an unknown name gets its own message
        raise CnnlabError(f"task={config.task!r} but {config.model.name} is a {registered} model; leave task=auto "
                          f"or pick a {config.task} model (`cnnlab models --task {config.task}`)")
    return task_class(registered)(config.loss)


__all__ = ["ClassificationTask", "DetectionTask", "LossMeter", "Meter", "ReconstructionTask", "StepOutput", "Task",
           "TaskResult", "get_task", "register_task", "task_class", "task_names"]
