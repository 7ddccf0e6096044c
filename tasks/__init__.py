"""One module per task family behind the `tasks.base.Task` interface."""

from tasks.classification import ClassificationTask
from tasks.generation import GenerationTask
from tasks.translation import TranslationTask

TASKS = {t.name: t for t in (TranslationTask, GenerationTask, ClassificationTask)}


def get_task(config, workdir=None, training: bool = True):
  """The task object for `config.task` (validated beforehand); see `base.Task`."""
  return TASKS[config.task](config, workdir, training)
