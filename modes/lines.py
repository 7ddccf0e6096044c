"""--mode=decode and --mode=predict: a line of output for each line of input, through the
pmapped `task.predict` of a checkpoint (a family that is a `tasks.base.LineMapper`)."""

from typing import List, Optional, Sequence

import jax
import ml_collections
import numpy as np

import tasks
from errors import UserError
from input_pipeline import batching
from modes.run import open_run
from training import preemption, steps

WHAT = {"decode": "translates text", "predict": "labels text", "generate": "continues text"}


def require_text_family(config: ml_collections.ConfigDict, mode: str, fits) -> None:
  """UserError unless config.task is a family for which `fits(family)` and the data is
  text: --mode=`mode` needs it."""
  wanted = [name for name, family in tasks.TASKS.items() if fits(family)]
  if config.task not in wanted or config.data.dataset == "synthetic":
    raise UserError(f"--mode={mode} {WHAT[mode]}: it needs config.task='{wanted[0]}' on real "
                    f"data (config.task={config.task!r}, "
                    f"config.data.dataset={config.data.dataset!r})")


def map_lines(config: ml_collections.ConfigDict, workdir: str, lines: List[str], mode: str,
              devices: Optional[Sequence[jax.Device]] = None, checkpoint: str = "latest",
              step: Optional[int] = None) -> List[str]:
  """Runs the checkpoint's `task.predict` on `lines` (--mode=`mode`, decode or predict):
  one output line per input line (an empty input line gives an empty output line)."""
  require_text_family(config, mode, lambda family: family.line_mode == mode)
  run = open_run(config, workdir, devices)
  _, params = run.restore(checkpoint, step)
  predictor = LinePredictor(run, params)
  return ["" if output is None else run.task.render_line(output)
          for output in predictor.outputs(lines, f"--mode={mode}")]


class LinePredictor:
  """A restored checkpoint's pmapped `task.predict` over lines of text, compiled once
  (the decode and predict modes, and api.Model)."""

  def __init__(self, run, params):
    assert isinstance(run.task, tasks.base.LineMapper), type(run.task)
    self.run = run
    _, _, self._p_predict = steps.compile_steps(run.task, run.tx, run.config, run.devices)
    self._params = steps.replicate(params, run.devices)

  def outputs(self, lines: List[str], doing: str = "predicting") -> List[Optional[np.ndarray]]:
    """The prediction for each line (decoded tokens, class probabilities), None for an
    empty line."""
    task, config = self.run.task, self.run.config
    wanted = [i for i, line in enumerate(lines) if line.strip()]
    examples = task.encode_lines([lines[i] for i in wanted])
    outputs: List[Optional[np.ndarray]] = [None] * len(lines)
    if not examples:
      return outputs
    dataset = batching.batched_dataset(examples, batch_size=config.eval.eval_batch_size,
                                       num_devices=len(self.run.devices),
                                       lengths=task.eval_lengths, shuffle=False)
    for number, batch in enumerate(batching.iterate(dataset)):
      preemption.check(f"{doing} (batch {number + 1})")
      predictions = np.asarray(self._p_predict(self._params, batch))
      flat_inputs = batch["inputs"].reshape((-1, batch["inputs"].shape[-1]))
      flat_index = batch["index"].reshape(-1)
      flat_predictions = predictions.reshape((-1,) + predictions.shape[2:])
      for x, index, output in zip(flat_inputs, flat_index, flat_predictions):
        if x.any():
          outputs[wanted[int(index)]] = output
    return outputs


def decode_lines(config, workdir, lines, devices=None, checkpoint="latest", step=None):
  """Translates `lines` with a checkpoint of `workdir` (see `map_lines`)."""
  return map_lines(config, workdir, lines, "decode", devices, checkpoint, step)


def predict_lines(config, workdir, lines, devices=None, checkpoint="latest", step=None):
  """Classifies `lines` with a checkpoint of `workdir`: per line the predicted class and the
  class probabilities as the task's `render_line` writes them (see `map_lines`)."""
  return map_lines(config, workdir, lines, "predict", devices, checkpoint, step)
