"""Scores of a classifier from (true, predicted) class ids: accuracy, macro F1 and the
confusion matrix, as numbers, a text table and an image for TensorBoard."""

from typing import Dict, List, Sequence

import numpy as np


def confusion_matrix(labels: Sequence[int], predicted: Sequence[int],
                     num_classes: int) -> np.ndarray:
  """`[num_classes, num_classes]` int64 counts: row = true class, column = predicted."""
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels, np.int64), np.asarray(predicted, np.int64)), 1)
  return matrix


def f1_per_class(matrix: np.ndarray) -> np.ndarray:
  """F1 = 2 tp / (2 tp + fp + fn) of each class; 0 where the class is neither a label nor a
  prediction (those classes are left out of the macro average, see `scores`)."""
  tp = np.diag(matrix).astype(np.float64)
  denominator = matrix.sum(0) + matrix.sum(1)  # (tp + fp) + (tp + fn)
  return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def scores(matrix: np.ndarray) -> Dict[str, float]:
  """accuracy and macro_f1 of a confusion matrix.

  macro_f1 is the unweighted mean of the per-class F1 over the classes that occur as a
  label or as a prediction (as scikit-learn's f1_score(average="macro") without `labels`):
  a class absent from both says nothing about the classifier, while a true class never
  predicted, or a class predicted but never true, counts with F1 0.
  """
  total = matrix.sum()
  seen = (matrix.sum(0) + matrix.sum(1)) > 0
  f1 = f1_per_class(matrix)
  return {"accuracy": float(np.trace(matrix) / max(total, 1)),
          "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0}


def table(matrix: np.ndarray, names: List[str]) -> str:
  """The confusion matrix as aligned text: rows true labels, columns predictions, with the
  per-class F1 beside each row."""
  f1 = f1_per_class(matrix)
  corner = "true \\ predicted"
  width = max([len(corner)] + [len(n) for n in names])
  cells = max([len(n) for n in names] + [len(str(int(matrix.max(initial=0))))]) + 1
  lines = [f"{corner:<{width}}" + "".join(f"{n:>{cells}}" for n in names)
           + f"{'F1':>8}"]
  for name, row, score in zip(names, matrix, f1):
    lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{cells}}" for v in row)
                 + f"{score:8.4f}")
  return "\n".join(lines)


def image(matrix: np.ndarray, names: List[str]) -> np.ndarray:
  """The confusion matrix drawn as a heat map with class names and counts on the cells:
  `[height, width, 3]` uint8 (rows true labels, columns predictions)."""
  # Imported here: only evaluations that write images need matplotlib. The Agg canvas is
  # used directly, so no global pyplot state or display backend is touched.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  n = len(names)
  side = min(3.0 + 0.6 * n, 16.0)
  figure = Figure(figsize=(side + 1.0, side), dpi=80)
  canvas = FigureCanvasAgg(figure)
  axes = figure.add_subplot(1, 1, 1)
  rows = matrix.sum(1, keepdims=True)
  shares = matrix / np.maximum(rows, 1)  # colour by the share of each true class
  axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  axes.set_xticks(range(n), labels=names, rotation=45 if n > 4 else 0, ha="right"
                  if n > 4 else "center")
  axes.set_yticks(range(n), labels=names)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true")
  if n <= 30:
    for i in range(n):
      for j in range(n):
        axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                  color="white" if shares[i, j] > 0.5 else "black", fontsize=9)
  figure.tight_layout()
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()
