"""Attention maps: what every head of a trained model attends to, and which heads matter.

- `example_maps`: the weights of every layer and head for a few examples, read from the
  reference attention path (a copy of the task's model with attention_impl="reference";
  the model used for training is untouched), padding cut off, tokens as their pieces.
- `head_statistics`: per-head numbers from the weights (pure numpy): entropy, mean
  attended distance, weight on the previous token, the first token and the diagonal, and
  the peak weight of a row (for cross-attention: how sharply a target token aligns).
- `layer_grid_png`, `overview_png`, `head_png`, `kind_grid_image`: heatmaps (matplotlib,
  Agg canvas) with the token pieces on the axes, all on one colour scale (weights 0 to 1)
  with a colour bar, as PNG bytes or an image array.
- `head_importance`: the loss with each head switched off in turn (the `head_mask`
  collection of models/attention.py), and its table and heatmap.

Three kinds of attention, named after where they sit: "encoder_self", "decoder_self" and
"cross" (decoder queries over encoder keys). Rows are queries, columns keys. The decoder
reads its targets shifted right, so decoder self-attention shows the decoder inputs ("<s>"
first) on both axes, while cross-attention rows show the target token each position
predicts (the usual alignment picture: a target word against the source words).
"""

import dataclasses
import functools
import io
import json
import math
import os
import re
import warnings
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import files
from input_pipeline import local_builders
from training import reporting

DataError = local_builders.DataError
KINDS = ("encoder_self", "decoder_self", "cross")
TITLES = {"encoder_self": "encoder self-attention", "decoder_self": "decoder self-attention",
          "cross": "cross-attention: target (rows) over source"}
_PATHS = {"encoder_self": ("encoder", "self_attention"),
          "decoder_self": ("decoder", "self_attention"),
          "cross": ("decoder", "cross_attention")}  # module path: stack, block_i, name
STATS = ("entropy", "distance", "previous", "first", "diagonal", "peak")
START, CLS = "<s>", "<cls>"  # labels of the decoder's start symbol and the classifier's vector

# Figure sizes in pixels (the PNGs come out exactly this size): a labelled map gets CELL
# pixels per token plus MARGIN for its tick labels, within [MIN_PANEL, MAX_PANEL]; an
# overview thumbnail gets THUMB_CELL pixels per token plus THUMB_MARGIN, within [THUMB,
# THUMB_MAX] (THUMB square, unlabelled, past LABELLED_THUMBS tokens); TITLE pixels on top
# of every figure; COLORBAR on the right of every attention figure.
DPI = 100
CELL, MARGIN, MIN_PANEL, MAX_PANEL = 22, 160, 250, 1800
THUMB, THUMB_CELL, THUMB_MARGIN, THUMB_MAX = 200, 11, 90, 440
TITLE, COLORBAR, ROW_LABEL = 50, 90, 110
GRID_COLUMNS = 4  # heads per row of a layer grid
LABELLED_THUMBS = 32  # overview thumbnails carry token labels up to this many tokens
# Tick labels longer than this many characters are cut (with "…") so that they stay in
# their margin: (labelled map, overview thumbnail).
LABEL_CHARS = (12, 8)
# Every attention figure colours weights on one fixed scale, 0 to 1 (a weight is a
# probability): a colour means the same weight in every panel, figure, checkpoint and
# TensorBoard image, so a near-uniform head (weights near 1/keys) stays dark next to a
# focused one. A per-panel scale would stretch the uniform head to full brightness.
WEIGHT_RANGE = (0.0, 1.0)
WEIGHT_LABEL = "attention weight"  # the colour bar's label
# SentencePiece's word-start mark "\u2581" is drawn by the font as a bar below the line,
# detached from its piece; the axes write it as the byte tokenizer writes a space.
SPACE_MARK = "\u2423"


# ----------------------------------------------------------------------------- extraction


def layout(task) -> Dict[str, Tuple[int, int]]:
  """`{kind: (layers, heads)}` of the attentions in the task's model; empty for a model
  without attention (a classifier whose encoder is only its recurrent reading)."""
  fields, cfg = task.attention_fields, task.model.config
  out = {}
  if "encoder" in fields:
    out["encoder_self"] = (cfg.num_encoder_layers, cfg.num_heads)
  if "decoder" in fields:
    out["decoder_self"] = (cfg.num_decoder_layers, cfg.num_heads)
  if "encoder" in fields and "decoder" in fields:
    out["cross"] = (cfg.num_decoder_layers, cfg.num_heads)
  return {kind: shape for kind, shape in out.items() if shape[0]}


def require_attention(task) -> Dict[str, Tuple[int, int]]:
  """`layout(task)`, or a DataError naming why there is nothing to inspect."""
  shapes = layout(task)
  if not shapes:
    raise DataError("this model has no attention layers to inspect (config.model."
                    "num_encoder_layers=0: its encoder is the recurrent reading alone)")
  return shapes


def reference_model(model):
  """The same model (same parameters) through the reference attention path, whose
  weights are sown into the `intermediates` collection; no cache, no dropout."""
  return type(model)(dataclasses.replace(model.config, attention_impl="reference",
                                         remat="none", scan_layers=False, decode=False))


@functools.lru_cache(maxsize=8)
def _weights_function(model):
  """jitted (params, model inputs) -> `{kind: [batch, layers, heads, q, kv]}` float32."""
  def run(params, inputs):
    _, state = model.apply({"params": params}, **inputs, mutable=["intermediates"])
    tree = state["intermediates"]
    out = {}
    for kind, (stack, name) in _PATHS.items():
      blocks = tree.get(stack, {})
      found = [blocks[f"block_{i}"][name]["attention_weights"][0]
               for i in range(len(blocks)) if name in blocks.get(f"block_{i}", {})]
      if found:
        out[kind] = jnp.stack(found, axis=1)
    return out
  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def _predict_function(task):
  return jax.jit(task.predict)


def _pad(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


def _until_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """Tokens up to and including the first EOS (all non-padding ones when there is none)."""
  tokens = np.asarray(tokens, np.int32)
  ends = np.flatnonzero(tokens == eos_id)
  return tokens[:ends[0] + 1] if ends.size else tokens[tokens > 0]


def complete_example(task, params, example: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """`example` with the decoder's field filled in by the model's own output where it is
  missing (translation without a reference: decoded as --mode=decode does)."""
  example = {k: np.asarray(v) for k, v in example.items()}
  field = task.attention_fields.get("decoder")
  if field is None or field in example:
    return example
  length = max(task.eval_lengths["inputs"], len(example["inputs"]))
  batch = {"inputs": _pad([example["inputs"]], length)}
  predicted = np.asarray(_predict_function(task)(params, batch))[0]
  example[field] = _until_eos(predicted, task.eos_id)
  if not example[field].size:
    example[field] = np.array([task.eos_id], np.int32)
  return example


@dataclasses.dataclass
class AttentionMaps:
  """One example's attention weights without padding.

  weights: `{kind: [layers, heads, queries, keys]}` float32; each row sums to 1.
  queries, keys: `{kind: [pieces]}`, the token piece on each axis.
  """
  weights: Dict[str, np.ndarray]
  queries: Dict[str, List[str]]
  keys: Dict[str, List[str]]

  def stats(self) -> Dict[str, Dict[str, np.ndarray]]:
    """`{kind: {stat: [layers, heads]}}`, see `head_statistics`."""
    return {kind: head_statistics(w) for kind, w in self.weights.items()}


def example_maps(task, params, examples: Sequence[Mapping[str, np.ndarray]]
                 ) -> List[AttentionMaps]:
  """The attention maps of unpadded `examples` (dicts of the task's batch fields; a
  translation example without "targets" is decoded first), computed in one batch."""
  examples = [complete_example(task, params, e) for e in examples]
  fields = sorted(set(task.attention_fields.values()))
  batch = {}
  for field in fields:
    longest = max(len(e[field]) for e in examples)
    batch[field] = _pad([e[field] for e in examples],
                        max(task.eval_lengths.get(field, 0), longest))
  model = reference_model(task.model)
  weights = jax.device_get(_weights_function(model)(task.decode_params(params),
                                                     task.model_inputs(batch)))
  out = []
  for b, example in enumerate(examples):
    maps = AttentionMaps({}, {}, {})
    encoder = decoder = targets = None
    if "encoder" in task.attention_fields:
      tokens = example[task.attention_fields["encoder"]]
      tokens = tokens[tokens > 0]
      encoder = task.token_pieces(tokens, task.attention_fields["encoder"])
      if weights["encoder_self"].shape[-1] == batch[task.attention_fields["encoder"]].shape[1] + 1:
        encoder = [CLS] + encoder  # the classifier's learned vector sits before the tokens
    if "decoder" in task.attention_fields:
      field = task.attention_fields["decoder"]
      tokens = example[field]
      tokens = tokens[tokens > 0]
      targets = task.token_pieces(tokens, field)
      decoder = [START] + targets[:-1]  # what the decoder reads: targets shifted right
    axes = {"encoder_self": (encoder, encoder), "decoder_self": (decoder, decoder),
            "cross": (targets, encoder)}
    for kind, w in weights.items():
      rows, cols = axes[kind]
      maps.weights[kind] = np.asarray(w[b, :, :, :len(rows), :len(cols)], np.float32)
      maps.queries[kind], maps.keys[kind] = list(rows), list(cols)
    out.append(maps)
  return out


# ----------------------------------------------------------------------------- statistics


def head_statistics(weights: np.ndarray) -> Dict[str, np.ndarray]:
  """Per-head statistics of attention weights `[..., queries, keys]` (padding removed;
  each row a distribution over the keys), each averaged over the query rows -> `[...]`.

  entropy: -sum_j p_ij log p_ij in nats (0 = one key; log(keys) = uniform).
  distance: sum_j p_ij |i - j|, the mean distance attended to, in positions.
  previous: p_i,i-1 (rows i >= 1), the weight on the previous position.
  first: p_i0, the weight on the first position (often a "no-op" sink).
  diagonal: p_ii (rows i < keys), the weight on the same position.
  peak: max_j p_ij; for cross-attention, how sharply each target token aligns to a
    single source position (1 = hard alignment, 1/keys = none).
  Rows with no such key (the first row for `previous`) are left out of that mean; NaN
  when no row has one.
  """
  p = np.asarray(weights, np.float64)
  q, k = p.shape[-2:]
  i = np.arange(q)[:, None]
  j = np.arange(k)[None, :]
  with np.errstate(divide="ignore", invalid="ignore"):
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)

  def mean_where(values, rows):
    rows = np.asarray(rows, bool)
    if not rows.any():
      return np.full(p.shape[:-2], np.nan)
    return values[..., rows].mean(-1)

  def band(offset):  # p_i,i+offset for each row i (0 where the column does not exist)
    cols = np.arange(q) + offset
    ok = (cols >= 0) & (cols < k)
    picked = np.take(p, np.clip(cols, 0, k - 1), axis=-1)[..., np.arange(q), np.arange(q)]
    return picked, ok

  previous, has_previous = band(-1)
  diagonal, has_diagonal = band(0)
  every = np.ones(q, bool)
  return {
      "entropy": mean_where(-plogp.sum(-1), every),
      "distance": mean_where((p * np.abs(i - j)).sum(-1), every),
      "previous": mean_where(previous, has_previous),
      "first": mean_where(p[..., 0], every),
      "diagonal": mean_where(diagonal, has_diagonal),
      "peak": mean_where(p.max(-1), every),
  }


def mean_stats(per_example: Sequence[Mapping[str, Mapping[str, np.ndarray]]]
               ) -> Dict[str, Dict[str, np.ndarray]]:
  """The per-head statistics of several examples, averaged example by example."""
  with warnings.catch_warnings():  # a statistic no example has stays NaN, silently
    warnings.simplefilter("ignore", RuntimeWarning)
    return {kind: {s: np.nanmean(np.stack([e[kind][s] for e in per_example]), axis=0)
                   for s in STATS} for kind in per_example[0]}


def stats_table(stats: Mapping[str, Mapping[str, np.ndarray]]) -> str:
  """One aligned line per head: kind, layer, head and each statistic."""
  header = f"{'attention':<13}{'layer':>6}{'head':>5}" + "".join(f"{s:>10}" for s in STATS)
  lines = [header]
  for kind, values in stats.items():
    layers, heads = values[STATS[0]].shape
    for layer in range(layers):
      for head in range(heads):
        lines.append(f"{kind:<13}{layer:>6}{head:>5}" + "".join(
            f"{values[s][layer, head]:>10.3f}" for s in STATS))
  return "\n".join(lines)


def stats_json(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict:
  """`{kind: {stat: [[per head] per layer]}}` with NaN as None."""
  return {kind: {s: [[None if math.isnan(v) else float(v) for v in row] for row in a]
                 for s, a in values.items()} for kind, values in stats.items()}


def summary_table(stats: Mapping[str, Mapping[str, np.ndarray]]) -> str:
  """A short table for the logs: each statistic's mean over the layers and heads of each
  kind."""
  lines = [f"{'attention':<13}" + "".join(f"{s:>10}" for s in STATS)]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    for kind, values in stats.items():
      lines.append(f"{kind:<13}" + "".join(f"{np.nanmean(values[s]):>10.3f}" for s in STATS))
  return "\n".join(lines)


def summary_scalars(stats: Mapping[str, Mapping[str, np.ndarray]]) -> Dict[str, float]:
  """`{"<kind>/<stat>": mean over layers and heads}`: a few curves to watch in TensorBoard
  (the per-head numbers go in the text table)."""
  out = {}
  for kind, values in stats.items():
    for s in STATS:
      if not np.all(np.isnan(values[s])):
        out[f"{kind}/{s}"] = float(np.nanmean(values[s]))
  return out


# ----------------------------------------------------------------------------- pictures


def _side(tokens: int) -> int:
  return min(MAX_PANEL, max(MIN_PANEL, MARGIN + CELL * tokens))


def panel_pixels(queries: int, keys: int) -> Tuple[int, int]:
  """(width, height) of one labelled map of `queries` x `keys` tokens."""
  return _side(keys), _side(queries)


def layer_grid_pixels(heads: int, queries: int, keys: int) -> Tuple[int, int]:
  """(width, height) of `layer_grid_png`: GRID_COLUMNS heads a row, then the colour bar."""
  width, height = panel_pixels(queries, keys)
  columns = min(heads, GRID_COLUMNS)
  return columns * width + COLORBAR, -(-heads // columns) * height + TITLE


def thumb_pixels(tokens: int) -> int:
  """The side of an overview thumbnail whose longest axis has `tokens` tokens."""
  if tokens > LABELLED_THUMBS:
    return THUMB
  return min(THUMB_MAX, max(THUMB, THUMB_MARGIN + THUMB_CELL * tokens))


def overview_pixels(rows: int, heads: int, tokens: int) -> Tuple[int, int]:
  """(width, height) of an overview of `rows` (kind, layer) rows of `heads` thumbnails
  whose longest axis has `tokens` tokens, and the colour bar."""
  side = thumb_pixels(tokens)
  return ROW_LABEL + heads * side + COLORBAR, rows * side + TITLE


def head_pixels(queries: int, keys: int) -> Tuple[int, int]:
  """(width, height) of `head_png`."""
  width, height = panel_pixels(queries, keys)
  return width + COLORBAR, height + TITLE


def _figure(pixels: Tuple[int, int]):
  # The Agg canvas is used directly: no pyplot state, no display backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  figure = Figure(figsize=(pixels[0] / DPI, pixels[1] / DPI), dpi=DPI)
  FigureCanvasAgg(figure)
  return figure


def _place(figure, pixels, left, top, width, height, pad=(0, 0, 0, 0)):
  """Axes at a pixel box (from the top left), shrunk by pad = (left, right, top, bottom)."""
  w, h = pixels
  x0, x1 = left + pad[0], left + width - pad[1]
  y0, y1 = top + pad[2], top + height - pad[3]
  return figure.add_axes((x0 / w, 1 - y1 / h, max(x1 - x0, 1) / w, max(y1 - y0, 1) / h))


def tick_label(piece: str, limit: int) -> str:
  """How a token piece is written on an axis: SentencePiece's word-start mark as
  SPACE_MARK, cut to `limit` characters."""
  text = piece.replace("\u2581", SPACE_MARK)
  return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _draw(axes, weights: np.ndarray, rows: List[str], cols: List[str], labels: bool,
          fontsize: float = 7.0, limit: int = LABEL_CHARS[0]):
  """One heatmap on the shared WEIGHT_RANGE colour scale."""
  image = axes.imshow(weights, cmap="viridis", vmin=WEIGHT_RANGE[0], vmax=WEIGHT_RANGE[1],
                      aspect="auto", interpolation="nearest")
  if labels:
    axes.set_xticks(range(len(cols)), labels=[tick_label(c, limit) for c in cols],
                    rotation=90, fontsize=fontsize)
    axes.set_yticks(range(len(rows)), labels=[tick_label(r, limit) for r in rows],
                    fontsize=fontsize)
    axes.tick_params(length=2, pad=1)
  else:
    axes.set_xticks([])
    axes.set_yticks([])
  return image


def _colorbar(figure, image, axes) -> None:
  """The colour bar of the figure's one scale, in the box `axes`."""
  bar = figure.colorbar(image, cax=axes)
  bar.set_label(WEIGHT_LABEL, fontsize=8)
  bar.ax.tick_params(labelsize=7)


def _title(figure, pixels, text: str) -> None:
  figure.suptitle(text, y=1 - 0.5 * TITLE / pixels[1], va="center", fontsize=9)


def _png(figure) -> bytes:
  buffer = io.BytesIO()
  with warnings.catch_warnings():  # pieces in scripts the font lacks draw as boxes
    warnings.simplefilter("ignore")
    figure.savefig(buffer, format="png", dpi=DPI)
  return buffer.getvalue()


def _array(figure) -> np.ndarray:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    figure.canvas.draw()
  return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()


def _layer_grid(maps: AttentionMaps, kind: str, layer: int):
  weights = maps.weights[kind][layer]
  heads, q, k = weights.shape
  pixels = layer_grid_pixels(heads, q, k)
  width, height = panel_pixels(q, k)
  figure = _figure(pixels)
  _title(figure, pixels, f"{TITLES[kind]}\nlayer {layer}")
  columns = min(heads, GRID_COLUMNS)
  # Tick labels take the left and bottom margins; the head's title the top one.
  pad = (MARGIN // 2, 10, 25, MARGIN // 2)
  for head in range(heads):
    r, c = divmod(head, columns)
    axes = _place(figure, pixels, c * width, TITLE + r * height, width, height, pad)
    image = _draw(axes, weights[head], maps.queries[kind], maps.keys[kind], labels=True)
    axes.set_title(f"head {head}", fontsize=8)
  bar = _place(figure, pixels, columns * width, TITLE, COLORBAR, pixels[1] - TITLE,
               (10, 50, pad[2], pad[3]))
  _colorbar(figure, image, bar)
  return figure


def layer_grid_png(maps: AttentionMaps, kind: str, layer: int) -> bytes:
  """Every head of one layer of one kind, GRID_COLUMNS a row, tokens on the axes, one
  colour scale (WEIGHT_RANGE) and its bar."""
  return _png(_layer_grid(maps, kind, layer))


def _overview(maps: AttentionMaps, kinds: Sequence[str]):
  rows = [(kind, layer) for kind in kinds for layer in range(maps.weights[kind].shape[0])]
  heads = maps.weights[kinds[0]].shape[1]
  tokens = max(max(maps.weights[kind].shape[2:]) for kind in kinds)
  pixels = overview_pixels(len(rows), heads, tokens)
  side = thumb_pixels(tokens)
  labels = tokens <= LABELLED_THUMBS
  # Labels: left and bottom margins sized for LABEL_CHARS[1] characters, so that they
  # stay clear of the next thumbnail and of the title of the row below.
  pad = (THUMB_MARGIN - 20, 6, 20, THUMB_MARGIN - 20) if labels else (6, 6, 20, 6)
  figure = _figure(pixels)
  _title(figure, pixels, "attention of every layer (rows) and head (columns)"
         if len(kinds) > 1 else TITLES[kinds[0]])
  short = {"encoder_self": "enc self", "decoder_self": "dec self", "cross": "cross"}
  for r, (kind, layer) in enumerate(rows):
    for head in range(heads):
      axes = _place(figure, pixels, ROW_LABEL + head * side, TITLE + r * side, side, side,
                    pad)
      image = _draw(axes, maps.weights[kind][layer, head], maps.queries[kind],
                    maps.keys[kind], labels=labels, fontsize=6.5, limit=LABEL_CHARS[1])
      axes.set_title(f"head {head}", fontsize=7.5, pad=3)
    figure.text(6 / pixels[0], 1 - (TITLE + (r + 0.5) * side) / pixels[1],
                f"{short[kind]}\nlayer {layer}", fontsize=9, va="center")
  bar = _place(figure, pixels, ROW_LABEL + heads * side, TITLE, COLORBAR,
               pixels[1] - TITLE, (10, 50, pad[2], pad[3]))
  _colorbar(figure, image, bar)
  return figure


def overview_png(maps: AttentionMaps) -> bytes:
  """Every kind, layer (rows) and head (columns) as thumbnails in one picture, on one
  colour scale (WEIGHT_RANGE) with its bar."""
  return _png(_overview(maps, [k for k in KINDS if k in maps.weights]))


def kind_grid_image(maps: AttentionMaps, kind: str) -> np.ndarray:
  """The overview of one kind as an image array `[height, width, 3]` uint8 (TensorBoard)."""
  return _array(_overview(maps, [kind]))


def head_png(maps: AttentionMaps, kind: str, layer: int, head: int) -> bytes:
  """One head at full size with its colour bar (the same scale as the other figures)."""
  weights = maps.weights[kind][layer, head]
  q, k = weights.shape
  pixels = head_pixels(q, k)
  width, height = panel_pixels(q, k)
  figure = _figure(pixels)
  _title(figure, pixels, f"{TITLES[kind]}\nlayer {layer}, head {head}")
  axes = _place(figure, pixels, 0, TITLE, width, height, (MARGIN // 2, 10, 10, MARGIN // 2))
  image = _draw(axes, weights, maps.queries[kind], maps.keys[kind], labels=True, fontsize=8)
  bar = _place(figure, pixels, width, TITLE, COLORBAR, height, (10, 50, 10, MARGIN // 2))
  _colorbar(figure, image, bar)
  return _png(figure)


# ----------------------------------------------------------------------------- files


def parse_head(spec: str, available: Mapping[str, Tuple[int, int]]
               ) -> List[Tuple[str, int, int]]:
  """'L:H' (that head in every kind) or 'KIND:L:H' -> [(kind, layer, head)]; DataError
  naming what exists otherwise."""
  parts = spec.split(":")
  kinds = list(available)
  if len(parts) == 3:
    kinds, parts = [parts[0]], parts[1:]
  bad = len(parts) != 2 or not all(re.fullmatch(r"\d+", p) for p in parts)
  if bad or kinds[0] not in available:
    raise DataError(f"--attention_head={spec!r}: expected LAYER:HEAD or KIND:LAYER:HEAD with "
                    f"KIND one of {', '.join(available)}")
  layer, head = int(parts[0]), int(parts[1])
  for kind in kinds:
    layers, heads = available[kind]
    if layer >= layers or head >= heads:
      raise DataError(f"--attention_head={spec!r}: {kind} has layers 0-{layers - 1} and "
                      f"heads 0-{heads - 1}")
  return [(kind, layer, head) for kind in kinds]


def write_maps(maps: AttentionMaps, directory: str,
               heads: Sequence[Tuple[str, int, int]] = (), about: Optional[dict] = None
               ) -> List[str]:
  """Writes into `directory`: overview.png, <kind>_layer<i>.png for every layer,
  <kind>_layer<i>_head<j>.png for each of `heads`, stats.txt and stats.json (the per-head
  statistics and `about`: the tokens, the checkpoint). Returns the paths written."""
  paths = [files.write_atomically(os.path.join(directory, "overview.png"), overview_png(maps))]
  for kind in KINDS:
    for layer in range(maps.weights[kind].shape[0] if kind in maps.weights else 0):
      paths.append(files.write_atomically(os.path.join(directory, f"{kind}_layer{layer}.png"),
                          layer_grid_png(maps, kind, layer)))
  for kind, layer, head in heads:
    paths.append(files.write_atomically(
        os.path.join(directory, f"{kind}_layer{layer}_head{head}.png"),
                        head_png(maps, kind, layer, head)))
  stats = maps.stats()
  paths.append(files.write_atomically(os.path.join(directory, "stats.txt"),
                                      stats_table(stats) + "\n"))
  report = {**(about or {}), "tokens": {kind: {"queries": maps.queries[kind],
                                               "keys": maps.keys[kind]}
                                        for kind in maps.weights},
            "statistics": stats_json(stats)}
  paths.append(files.write_atomically(os.path.join(directory, "stats.json"),
                      json.dumps(report, indent=1, ensure_ascii=False) + "\n"))
  return paths


def directory_name(text: str) -> str:
  """A file-system-safe name from the start of `text` ('input' when nothing is left)."""
  slug = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")[:40].strip("-")
  return slug or "input"


# ----------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalSummaries:
  """What an evaluation writes about attention (names without the "eval/" prefix)."""
  images: Dict[str, np.ndarray]  # "attention/example_<i>/<kind>": [height, width, 3] uint8
  texts: Dict[str, str]  # "attention/heads": the per-head statistics table
  scalars: Dict[str, float]  # "attention/<kind>/<stat>": means over layers and heads
  log: str  # the short table of those means


def eval_summaries(task, params, count: int) -> EvalSummaries:
  """The attention maps and statistics of the first `count` examples of the eval split
  (the same ones at every evaluation), with `params` on one device."""
  source = task.data_source("eval")
  examples = []
  for index in range(min(len(source), 4 * count)):  # skip the rare empty example
    example = source[index]
    if all(np.asarray(example[f]).any() for f in set(task.attention_fields.values())):
      examples.append({f: np.asarray(example[f]) for f in set(task.attention_fields.values())})
    if len(examples) == count:
      break
  if not examples or not layout(task):
    return EvalSummaries({}, {}, {}, "")
  maps = example_maps(task, params, examples)
  images = {f"attention/example_{i}/{kind}": kind_grid_image(m, kind)
            for i, m in enumerate(maps) for kind in m.weights}
  stats = mean_stats([m.stats() for m in maps])
  scalars = {f"attention/{k}": v for k, v in summary_scalars(stats).items()}
  return EvalSummaries(images, {"attention/heads": stats_table(stats)}, scalars,
                       summary_table(stats))


# ----------------------------------------------------------------------------- head importance


def head_mask_tree(masks: Mapping[str, np.ndarray]) -> dict:
  """The `head_mask` collection for `model.apply` from `{kind: [layers, heads]}` scales
  (1 keeps a head, 0 removes it)."""
  tree: dict = {}
  for kind, mask in masks.items():
    stack, name = _PATHS[kind]
    for layer, row in enumerate(np.asarray(mask, np.float32)):
      tree.setdefault(stack, {}).setdefault(f"block_{layer}", {})[name] = {"heads": row}
  return tree


def head_importance(shapes: Mapping[str, Tuple[int, int]],
                    loss_of: Callable[[Dict[str, np.ndarray]], float]
                    ) -> Tuple[float, Dict[str, np.ndarray]]:
  """(loss with every head, `{kind: [layers, heads]}` loss increase with that one head
  removed), from `loss_of({kind: [layers, heads] scales})`. A long run logs a progress
  line ("head importance: head 12/24  ETA 1m10s")."""
  ones = {kind: np.ones(shape, np.float32) for kind, shape in shapes.items()}
  progress = reporting.PhaseProgress("head importance: head",
                                     sum(layers * heads for layers, heads in shapes.values()))
  baseline = loss_of(ones)
  increase = {kind: np.zeros(shape, np.float64) for kind, shape in shapes.items()}
  for kind, (layers, heads) in shapes.items():
    for layer in range(layers):
      for head in range(heads):
        masks = {k: v.copy() for k, v in ones.items()}
        masks[kind][layer, head] = 0.0
        increase[kind][layer, head] = loss_of(masks) - baseline
        progress.update(progress.count + 1)
  progress.finish()
  return baseline, increase


def importance_rows(baseline: float, increase: Mapping[str, np.ndarray]) -> List[dict]:
  """One record per head, the costliest removal first."""
  rows = [{"attention": kind, "layer": layer, "head": head,
           "loss": baseline + float(v[layer, head]), "increase": float(v[layer, head])}
          for kind, v in increase.items() for layer in range(v.shape[0])
          for head in range(v.shape[1])]
  return sorted(rows, key=lambda r: -r["increase"])


def importance_markdown(baseline: float, increase: Mapping[str, np.ndarray],
                        limit: Optional[int] = None) -> str:
  rows = importance_rows(baseline, increase)[:limit]
  lines = [f"loss with every head: {baseline:.4f}", "",
           "| rank | attention | layer | head | loss without it | increase |",
           "|---:|---|---:|---:|---:|---:|"]
  lines += [f"| {n} | {r['attention']} | {r['layer']} | {r['head']} | {r['loss']:.4f} | "
            f"{r['increase']:+.4f} |" for n, r in enumerate(rows, 1)]
  return "\n".join(lines)


def importance_csv(baseline: float, increase: Mapping[str, np.ndarray]) -> str:
  lines = ["rank,attention,layer,head,loss,increase"]
  lines += [f"{n},{r['attention']},{r['layer']},{r['head']},{r['loss']:.6f},"
            f"{r['increase']:.6f}" for n, r in enumerate(importance_rows(baseline, increase), 1)]
  return "\n".join(lines) + "\n"


def importance_pixels(shapes: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
  """(width, height) of `importance_png`: one panel per kind, side by side, then the
  colour bar."""
  heads = max(h for _, h in shapes)
  layers = max(n for n, _ in shapes)
  panel_w, panel_h = 140 + 60 * heads, 110 + 45 * layers
  return panel_w * len(shapes) + COLORBAR, panel_h + TITLE


def importance_png(increase: Mapping[str, np.ndarray]) -> bytes:
  """Layers x heads heatmaps of the loss increase, one per kind, the values written in.

  One colour scale for the figure, symmetric about 0 (white: no change; red: the loss
  rises without the head) up to the largest |increase| of any kind: a loss increase has
  no natural bound, unlike an attention weight."""
  kinds = list(increase)
  pixels = importance_pixels([increase[k].shape for k in kinds])
  panel_w = (pixels[0] - COLORBAR) // len(kinds)
  figure = _figure(pixels)
  _title(figure, pixels, "loss increase when one head is removed")
  scale = max(max(float(np.abs(v).max()) for v in increase.values()), 1e-9)
  pad = (70, 20, 30, 60)
  for n, kind in enumerate(kinds):
    values = increase[kind]
    axes = _place(figure, pixels, n * panel_w, TITLE, panel_w, pixels[1] - TITLE, pad)
    image = axes.imshow(values, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
    axes.set_xticks(range(values.shape[1]))
    axes.set_yticks(range(values.shape[0]))
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_title(kind, fontsize=9)
    for layer in range(values.shape[0]):
      for head in range(values.shape[1]):
        v = values[layer, head]
        axes.text(head, layer, f"{v:+.3f}", ha="center", va="center", fontsize=7,
                  color="white" if abs(v) > 0.6 * scale else "black")
  bar = _place(figure, pixels, len(kinds) * panel_w, TITLE, COLORBAR, pixels[1] - TITLE,
               (10, 50, pad[2], pad[3]))
  figure.colorbar(image, cax=bar).set_label("loss increase", fontsize=8)
  bar.tick_params(labelsize=7)
  return _png(figure)


def write_importance(directory: str, stem: str, baseline: float,
                     increase: Mapping[str, np.ndarray], about: dict) -> List[str]:
  """<stem>.md (sorted table), .csv, .json and .png (layers x heads) in `directory`."""
  base = os.path.join(directory, stem)
  report = {**about, "baseline_loss": baseline,
            "increase": {k: v.tolist() for k, v in increase.items()},
            "ranking": importance_rows(baseline, increase)}
  return [files.write_atomically(base + ".md", importance_markdown(baseline, increase) + "\n"),
          files.write_atomically(base + ".csv", importance_csv(baseline, increase)),
          files.write_atomically(base + ".json", json.dumps(report, indent=1) + "\n"),
          files.write_atomically(base + ".png", importance_png(increase))]
