"""The modes besides training, one module each, every one opening its run the same way
(modes/run.py: the config, the task from the files training wrote in the workdir, a
checkpoint restored read-only):

    evaluate.py       --mode=eval: score a split, write scores and predictions
    lines.py          --mode=decode, --mode=predict: a line out for each line in
    generate.py       --mode=generate: continue prompts
    average.py        --mode=average: average the newest checkpoints
    inspect_heads.py  --mode=attention, --mode=head_importance
    sweep.py          --mode=sweep, --mode=sweep_report: train and compare variants
    ensemble.py       --ensemble (eval, predict): several classifiers as one
    workdir_config.py the config of an existing workdir (its config.json) with the flags
"""

import tasks
from modes.average import average_checkpoints
from modes.evaluate import evaluate_checkpoint
from modes.generate import generate_text
from modes.inspect_heads import attention_report, head_importance
from modes.lines import decode_lines, predict_lines, require_text_family



def check_mode_fits(config, mode: str) -> None:
  """UserError when --mode=`mode` (decode, predict, generate) does not apply to
  config.task on config.data.dataset."""
  if mode == "generate":
    require_text_family(config, mode, lambda f: issubclass(f, tasks.base.TextGenerator))
  else:
    require_text_family(config, mode, lambda f: f.line_mode == mode)


__all__ = ["check_mode_fits", "average_checkpoints", "evaluate_checkpoint", "generate_text",
           "attention_report",
           "head_importance", "decode_lines", "predict_lines"]
