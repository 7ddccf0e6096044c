"""Task families behind the `tasks.base.Task` interface, each reading a data source of
tasks/sources/ (synthetic digits or its own kind of text)."""

from tasks.classification import ClassificationTask, MaskedLMTask
from tasks import masked_lm
from tasks.generation import GenerationTask
from tasks.translation import TranslationTask

TASKS = {t.name: t for t in (TranslationTask, GenerationTask, ClassificationTask)}


def get_task(config, workdir=None, training: bool = True):
  """The task object for `config.task` (validated beforehand); see `base.Task`.
  config.objective="mlm" trains the classification family's encoder alone."""
  family = TASKS[config.task]
  if family is ClassificationTask and config.get("objective") == "mlm":
    family = MaskedLMTask
  return family(config, workdir, training)


def check_config(config) -> None:
  """Raises config_checks.ConfigError for the first field of the task, model or data that
  cannot work: the data fields (tasks/sources), the model (its TransformerConfig), then
  what the family itself needs."""
  from config_checks import Fields, fail  # pylint: disable=g-import-not-at-top
  from tasks import sources  # pylint: disable=g-import-not-at-top
  top = Fields(config)
  top.choice("task", tuple(TASKS))
  family = TASKS[config.task]
  top.choice("objective", masked_lm.OBJECTIVES)
  if family is not ClassificationTask:  # the fields of encoder pre-training and its use
    for field, value in (("objective", config.objective),
                         ("init_encoder_from", config.init_encoder_from),
                         ("optim.token_dropout", config.optim.token_dropout)):
      if value:
        fail(field, value, "it is for task=classification (an encoder alone) only")
  sources.check_config(config, family)
  family.check_model(config)
  # The decoding fields are checked whatever the family, as they always were.
  TranslationTask.check_beam_search(config)
  GenerationTask.check_sampling(config)
  family.check_config(config)
