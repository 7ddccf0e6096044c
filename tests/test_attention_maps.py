"""Attention maps and head importance: the weights drawn are the paper's formula on the
model's own activations, padding cut off; removing a head removes exactly its share of the
output; the per-head statistics on hand-built matrices; PNGs of the documented pixel size;
the maps in TensorBoard at each evaluation; and --mode=attention on a trained checkpoint."""

import io
import json
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

import modes
import tasks
import train
from models import attention, masks
from inspection import attention_maps
from tests.cli_helpers import run_main
from tests.test_translation import cli_flags, write_corpus
from tests.test_translation import tiny_config as tiny_translation_config
from tests.tiny_configs import tiny_config

ONE_DEVICE = jax.local_devices()[:1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes):
  assert data.startswith(PNG_SIGNATURE), data[:16]
  image = Image.open(io.BytesIO(data))
  image.load()  # decodes the whole file: a truncated PNG fails here
  return image.size


def file_png_size(path):
  assert os.path.getsize(path) > 1000, path
  with open(path, "rb") as f:
    return png_size(f.read())


# ----------------------------------------------------------------------------- the formula


def capture_attention_inputs(model, params, inputs):
  """{module path: (queries' input, keys' input)} of every attention call of the model."""
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, attention.MultiHeadAttention) and (
        context.method_name == "__call__"):
      x = np.asarray(args[0], np.float64)
      kv = np.asarray(args[1], np.float64) if len(args) > 1 and args[1] is not None else x
      seen[tuple(context.module.path)] = (x, kv)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, **inputs)
  return seen


def formula(params, path, x, kv, mask):
  """softmax(Q K^T / sqrt(d_k)) with masked logits at -inf, in float64: `[heads, q, kv]`."""
  node = params
  for name in path:
    node = node[name]
  wq = np.asarray(node["query"]["kernel"], np.float64)
  wk = np.asarray(node["key"]["kernel"], np.float64)
  q = np.einsum("ld,dhk->lhk", x, wq)
  k = np.einsum("ld,dhk->lhk", kv, wk)
  logits = np.einsum("qhk,shk->hqs", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[None], logits, -np.inf)
  logits -= logits.max(-1, keepdims=True)
  e = np.exp(logits)
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def translation_task():
  config = tiny_config("translation", model=dict(num_encoder_layers=2, num_decoder_layers=2))
  task = tasks.get_task(config)
  return task, task.init_params(jax.random.PRNGKey(3))


def test_maps_equal_the_formula_on_the_models_activations(translation_task):
  task, params = translation_task
  source = task.data_source("eval")
  examples = [{k: source[i][k] for k in ("inputs", "targets")} for i in range(3)]
  maps = attention_maps.example_maps(task, params, examples)

  # The same batch through the plain model, its attention inputs recorded.
  length = task.eval_lengths["inputs"]
  batch = {f: np.stack([np.pad(e[f], (0, length - len(e[f]))) for e in examples])
           for f in ("inputs", "targets")}
  seen = capture_attention_inputs(task.model, params, task.model_inputs(batch))
  assert len(seen) == 6  # 2 encoder self, 2 decoder self, 2 cross

  for b, (example, m) in enumerate(zip(examples, maps)):
    n_src, n_tgt = len(example["inputs"]), len(example["targets"])
    masks = {"encoder_self": np.ones((n_src, n_src), bool),
             "decoder_self": np.tril(np.ones((n_tgt, n_tgt), bool)),
             "cross": np.ones((n_tgt, n_src), bool)}
    stacks = {"encoder_self": ("encoder", "self_attention"),
              "decoder_self": ("decoder", "self_attention"),
              "cross": ("decoder", "cross_attention")}
    for kind, (stack, name) in stacks.items():
      assert m.weights[kind].shape == (2, 2) + masks[kind].shape  # [layers, heads, q, kv]
      for layer in range(2):
        path = (stack, f"block_{layer}", name)
        x, kv = seen[path]
        expected = formula(params, path, x[b, :masks[kind].shape[0]],
                           kv[b, :masks[kind].shape[1]], masks[kind])
        np.testing.assert_allclose(m.weights[kind][layer], expected, atol=2e-6)
      np.testing.assert_allclose(m.weights[kind].sum(-1), 1.0, atol=1e-5)
    assert m.keys["encoder_self"] == task.token_pieces(example["inputs"], "inputs")
    assert m.keys["encoder_self"][-1] == "</s>"
    assert m.queries["decoder_self"][0] == attention_maps.START
    assert m.queries["cross"] == task.token_pieces(example["targets"], "targets")


def test_padding_and_future_keys_get_no_weight(translation_task):
  task, params = translation_task
  example = {k: task.data_source("eval")[0][k] for k in ("inputs", "targets")}
  n_src, n_tgt = len(example["inputs"]), len(example["targets"])
  batch = {f: np.pad(example[f], (0, 8 - len(example[f])))[None] for f in example}
  weights = attention_maps._weights_function(attention_maps.reference_model(task.model))(
      params, task.model_inputs(batch))
  # Real query rows put (numerically) nothing on padding keys or future positions.
  assert float(np.abs(weights["encoder_self"][0, :, :, :n_src, n_src:]).max()) < 1e-6
  assert float(np.abs(weights["cross"][0, :, :, :n_tgt, n_src:]).max()) < 1e-6
  future = ~np.tril(np.ones((n_tgt, 8), bool))
  assert float(np.abs(weights["decoder_self"][0, :, :, :n_tgt][..., future]).max()) < 1e-6


def test_fused_models_are_drawn_through_the_reference_path(translation_task):
  task, params = translation_task
  config = tiny_config("translation", model=dict(num_encoder_layers=2, num_decoder_layers=2),
                       compute=dict(attention_impl="fused"))
  fused = tasks.get_task(config)
  assert fused.model.config.attention_impl == "fused"
  example = [{k: task.data_source("eval")[1][k] for k in ("inputs", "targets")}]
  got = attention_maps.example_maps(fused, params, example)[0]
  want = attention_maps.example_maps(task, params, example)[0]
  for kind in attention_maps.KINDS:
    np.testing.assert_allclose(got.weights[kind], want.weights[kind], atol=1e-6)
  assert fused.model.config.attention_impl == "fused"  # the task's model is left as it was


@pytest.mark.parametrize("fields", [{}, dict(conv_kernel=3), dict(encoder_lstm=True)])
def test_classifier_maps_show_the_cls_vector(fields):
  """Also with the convolution sublayer and with the recurrent reading before the blocks."""
  task = tasks.get_task(tiny_config("classification", model=dict(pooling="cls", **fields)))
  params = task.init_params(jax.random.PRNGKey(0))
  example = {"inputs": task.data_source("eval")[0]["inputs"]}
  m = attention_maps.example_maps(task, params, [example])[0]
  n = len(example["inputs"])
  assert list(m.weights) == ["encoder_self"]
  assert m.weights["encoder_self"].shape == (1, 2, n + 1, n + 1)
  assert m.keys["encoder_self"] == [attention_maps.CLS] + task.token_pieces(
      example["inputs"], "inputs")


# ----------------------------------------------------------------------------- head mask


def test_masking_a_head_removes_exactly_its_contribution():
  mha = attention.MultiHeadAttention(num_heads=3, head_dim=4)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  mask = masks.padding_mask(jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
                                jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]))
  params = mha.init(jax.random.PRNGKey(1), x, mask=mask)["params"]

  def run(scales=None):
    variables = {"params": params}
    if scales is not None:
      variables[attention.HEAD_MASK] = {"heads": jnp.asarray(scales, jnp.float32)}
    out, state = mha.apply(variables, x, mask=mask, mutable=["intermediates"])
    return np.asarray(out, np.float64), np.asarray(
        state["intermediates"]["attention_weights"][0])

  full, weights = run()
  np.testing.assert_array_equal(run([1, 1, 1])[0], full)  # all ones: the same numbers
  alone = [run(np.eye(3)[h])[0] for h in range(3)]  # each head's share of the output
  np.testing.assert_allclose(sum(alone), full, atol=1e-5)
  for h in range(3):
    without, masked_weights = run(1 - np.eye(3)[h])
    np.testing.assert_allclose(without, full - alone[h], atol=1e-5)
    np.testing.assert_array_equal(masked_weights, weights)  # the weights stay as they were
    assert np.abs(without - full).max() > 1e-3


def test_head_mask_reaches_the_named_layer_and_kind_only(translation_task):
  task, params = translation_task
  example = task.data_source("eval")[2]
  batch = {f: example[f][None] for f in ("inputs", "targets")}
  shapes = attention_maps.layout(task)
  assert shapes == {"encoder_self": (2, 2), "decoder_self": (2, 2), "cross": (2, 2)}
  ones = {k: np.ones(s, np.float32) for k, s in shapes.items()}

  def encode(masks):
    return np.asarray(task.model.apply(
        {"params": params, attention.HEAD_MASK: attention_maps.head_mask_tree(masks)},
        batch["inputs"], method="encode"))

  base = encode(ones)
  np.testing.assert_array_equal(
      base, np.asarray(task.model.apply({"params": params}, batch["inputs"], method="encode")))
  decoder_head = {**ones, "cross": np.array([[1, 0], [1, 1]], np.float32)}
  np.testing.assert_array_equal(encode(decoder_head), base)  # the encoder never sees it
  encoder_head = {**ones, "encoder_self": np.array([[1, 1], [0, 1]], np.float32)}
  assert np.abs(encode(encoder_head) - base).max() > 1e-4


def test_head_importance_removes_each_head_once_and_ranks_them():
  shapes = {"encoder_self": (2, 3), "cross": (1, 3)}
  cost = {"encoder_self": np.array([[0.1, 0.0, 0.5], [0.2, 0.0, 0.0]]),
          "cross": np.array([[0.0, 0.9, 0.0]])}
  calls = []

  def loss_of(masks):  # 1 + what the removed heads cost
    calls.append({k: v.copy() for k, v in masks.items()})
    return 1.0 + sum(float(((1 - masks[k]) * cost[k]).sum()) for k in masks)

  baseline, increase = attention_maps.head_importance(shapes, loss_of)
  assert baseline == 1.0 and len(calls) == 1 + 9
  assert all(sum(int((1 - m[k]).sum()) for k in m) == 1 for m in calls[1:])
  for kind in shapes:
    np.testing.assert_allclose(increase[kind], cost[kind])
  rows = attention_maps.importance_rows(baseline, increase)
  assert [(r["attention"], r["layer"], r["head"]) for r in rows[:3]] == [
      ("cross", 0, 1), ("encoder_self", 0, 2), ("encoder_self", 1, 0)]
  table = attention_maps.importance_markdown(baseline, increase).splitlines()
  assert table[4] == "| 1 | cross | 0 | 1 | 1.9000 | +0.9000 |"
  width, height = attention_maps.importance_pixels([(2, 3), (1, 3)])
  assert png_size(attention_maps.importance_png(increase)) == (width, height) == (
      2 * (140 + 60 * 3) + 90, 110 + 45 * 2 + 50)  # 90 px: the colour bar


# ----------------------------------------------------------------------------- statistics


def test_statistics_of_hand_built_heads():
  identity = np.eye(4)
  previous = np.eye(4, k=-1)
  previous[0, 0] = 1.0
  causal_uniform = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
  first = np.zeros((4, 4))
  first[:, 0] = 1.0
  stats = attention_maps.head_statistics(np.stack([identity, previous, causal_uniform,
                                                   first]))
  np.testing.assert_allclose(stats["entropy"], [0, 0, np.mean(np.log([1, 2, 3, 4])), 0],
                             atol=1e-12)
  np.testing.assert_allclose(stats["distance"], [0, 0.75, np.mean([0, 0.5, 1, 1.5]), 1.5])
  np.testing.assert_allclose(stats["previous"], [0, 1, np.mean([1 / 2, 1 / 3, 1 / 4]), 1 / 3])
  np.testing.assert_allclose(stats["first"], [0.25, 0.5, np.mean([1, 1 / 2, 1 / 3, 1 / 4]),
                                              1])  # rows 0 and 1 of `previous` look at 0
  np.testing.assert_allclose(stats["diagonal"], [1, 0.25, np.mean([1, 1 / 2, 1 / 3, 1 / 4]),
                                                 0.25])
  np.testing.assert_allclose(stats["peak"], [1, 1, np.mean([1, 1 / 2, 1 / 3, 1 / 4]), 1])


def test_statistics_of_a_rectangular_cross_attention():
  # 2 target tokens over 3 source tokens: a hard alignment and a uniform row.
  weights = np.array([[[0.0, 1.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]])
  stats = attention_maps.head_statistics(weights)
  np.testing.assert_allclose(stats["peak"], [(1 + 1 / 3) / 2])
  np.testing.assert_allclose(stats["entropy"], [np.log(3) / 2])
  np.testing.assert_allclose(stats["distance"], [(1 + (1 + 0 + 1) / 3) / 2])
  np.testing.assert_allclose(stats["diagonal"], [(0 + 1 / 3) / 2])
  np.testing.assert_allclose(stats["previous"], [1 / 3])  # row 1 only
  one_row = attention_maps.head_statistics(np.array([[[0.5, 0.5]]]))
  assert np.isnan(one_row["previous"][0])  # no row has a previous token


def test_stats_table_and_json_name_every_head():
  stats = {"decoder_self": attention_maps.head_statistics(
      np.broadcast_to(np.eye(3), (2, 4, 3, 3)))}
  lines = attention_maps.stats_table(stats).splitlines()
  assert len(lines) == 1 + 2 * 4
  assert lines[-1].split() == ["decoder_self", "1", "3", "0.000", "0.000", "0.000", "0.333",
                               "1.000", "1.000"]
  assert attention_maps.stats_json(stats)["decoder_self"]["diagonal"] == [[1.0] * 4] * 2


# ----------------------------------------------------------------------------- pictures


def hand_built_maps(layers=2, heads=3, q=5, k=7):
  rng = np.random.default_rng(0)
  weights = rng.random((layers, heads, q, k)).astype(np.float32)
  weights /= weights.sum(-1, keepdims=True)
  tgt = [f"t{i}" for i in range(q)]
  src = [f"s{i}" for i in range(k)]
  return attention_maps.AttentionMaps(
      weights={"encoder_self": weights[..., :k, :], "cross": weights},
      queries={"encoder_self": src, "cross": tgt}, keys={"encoder_self": src, "cross": src})


def test_pngs_have_the_documented_pixel_sizes():
  maps = hand_built_maps()
  # A labelled map is 160 px of margin + 22 px a token wide/high (at least 250 px).
  # Every figure has a 90 px colour bar on its right.
  side_7, side_5 = 160 + 22 * 7, max(250, 160 + 22 * 5)
  assert png_size(attention_maps.head_png(maps, "cross", 1, 2)) == (side_7 + 90, side_5 + 50)
  assert png_size(attention_maps.layer_grid_png(maps, "cross", 0)) == (3 * side_7 + 90,
                                                                       side_5 + 50)
  # 2 kinds x 2 layers = 4 rows of 3 thumbnails of 200 px (at least), 110 px of row labels.
  assert png_size(attention_maps.overview_png(maps)) == (110 + 3 * 200 + 90, 4 * 200 + 50)
  image = attention_maps.kind_grid_image(maps, "cross")
  assert image.shape == (2 * 200 + 50, 110 + 3 * 200 + 90, 3) and image.dtype == np.uint8
  assert image.std() > 10  # something is drawn
  # Six heads wrap after four; a long sentence is capped.
  assert attention_maps.layer_grid_pixels(6, 5, 7) == (4 * side_7 + 90, 2 * side_5 + 50)
  assert attention_maps.panel_pixels(500, 3) == (250, 1800)
  # Thumbnails grow 11 px a token past 10 tokens up to 440 px; unlabelled past 32 tokens.
  assert [attention_maps.thumb_pixels(t) for t in (5, 20, 32, 33)] == [200, 310, 440, 200]


def constant_heads_maps(values, q=5, k=7):
  """One layer of cross-attention whose head h has every weight `values[h]` (a one-hot
  diagonal where the value is None)."""
  heads = []
  for v in values:
    heads.append(np.eye(q, k, dtype=np.float32) if v is None else np.full((q, k), v, np.float32))
  weights = np.stack(heads)[None]
  return attention_maps.AttentionMaps(
      weights={"cross": weights}, queries={"cross": [f"t{i}" for i in range(q)]},
      keys={"cross": [f"s{i}" for i in range(k)]})


def viridis(value):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  return tuple(int(round(255 * c)) for c in colormaps["viridis"](value)[:3])


def png_pixels(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_every_figure_colours_weights_on_one_scale_with_its_bar():
  """A uniform head (1/7 on every key) is drawn as weight 1/7, dark, whatever the other
  heads hold, not stretched to the brightest colour as on a per-panel scale; equal
  weights are equal colours in every panel; the colour bar shows 0 to 1."""
  uniform = viridis(1 / 7)
  maps = constant_heads_maps([1 / 7, 1 / 7, None, 0.5])
  q, k = 5, 7
  width, height = attention_maps.panel_pixels(q, k)
  pad_l, pad_r, pad_t, pad_b = 80, 10, 25, 80
  grid = png_pixels(attention_maps.layer_grid_png(maps, "cross", 0))

  def centre(left, top, w, h, pads):  # the middle of a panel's map: row 2, column 3
    x = left + pads[0] + (w - pads[0] - pads[1]) * (3.5 / k)
    y = top + pads[2] + (h - pads[2] - pads[3]) * (2.5 / q)
    return grid_or_image[int(y), int(x)].astype(int)

  grid_or_image = grid
  expected = np.array([uniform, uniform, viridis(0.0), viridis(0.5)])
  colours = [centre(c * width, 50, width, height, (pad_l, pad_r, pad_t, pad_b))
             for c in range(4)]
  assert np.abs(np.array(colours) - expected).max() <= 2, colours
  side = attention_maps.thumb_pixels(k)
  pads = (attention_maps.THUMB_MARGIN - 20, 6, 20, attention_maps.THUMB_MARGIN - 20)
  for grid_or_image in (png_pixels(attention_maps.overview_png(maps)),
                        attention_maps.kind_grid_image(maps, "cross")):
    colours = [centre(110 + c * side, 50, side, side, pads) for c in range(4)]
    assert np.abs(np.array(colours) - expected).max() <= 2, colours
  # A figure of uniform heads only: no map pixel is near the top of the scale, while
  # its colour bar (the last 90 px) runs from viridis(0) to viridis(1).
  only_uniform = constant_heads_maps([1 / 7, 1 / 7])
  for image in (png_pixels(attention_maps.layer_grid_png(only_uniform, "cross", 0)),
                png_pixels(attention_maps.overview_png(only_uniform)),
                png_pixels(attention_maps.head_png(only_uniform, "cross", 0, 1)),
                attention_maps.kind_grid_image(only_uniform, "cross")):
    maps_part, bar = image[:, :-90].astype(int), image[:, -90:].astype(int)
    top = np.array(viridis(1.0))
    assert np.abs(maps_part - top).sum(-1).min() > 60
    assert np.abs(bar - top).sum(-1).min() < 30
    assert np.abs(bar - np.array(viridis(0.0))).sum(-1).min() < 30
    assert (np.abs(maps_part - np.array(uniform)).sum(-1) < 4).sum() > 1000


def test_labels_stay_clear_of_each_other_and_keep_the_word_mark_attached():
  """Long SentencePiece pieces: in the overview and a layer grid no head's tick labels or
  title reach another head, a row label or the figure's edge; "▁" is drawn as "␣"."""
  from matplotlib.transforms import Bbox  # pylint: disable=g-import-not-at-top
  words = ["\u2581Ein", "\u2581Fahrradfahrerinnenverein", "\u2581f\u00e4hrt", "rad",
           "\u2581", ".", "</s>"] * 3
  rng = np.random.default_rng(1)
  weights = rng.random((2, 3, len(words), len(words))).astype(np.float32)
  weights /= weights.sum(-1, keepdims=True)
  maps = attention_maps.AttentionMaps(
      weights={"encoder_self": weights, "cross": weights[:, :, :9]},
      queries={"encoder_self": words, "cross": words[:9]},
      keys={"encoder_self": words, "cross": words})
  # pylint: disable=protected-access
  for figure in (attention_maps._overview(maps, ["encoder_self", "cross"]),
                 attention_maps._layer_grid(maps, "encoder_self", 1)):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [a.get_tightbbox(renderer) for a in figure.axes]
    boxes += [t.get_window_extent(renderer) for t in figure.texts]
    inside = Bbox.from_bounds(0, 0, figure.bbox.width, figure.bbox.height)
    for i, box in enumerate(boxes):
      assert inside.containsx(box.x0) and inside.containsx(box.x1), (i, box)
      assert inside.containsy(box.y0) and inside.containsy(box.y1), (i, box)
      for other in boxes[i + 1:]:
        assert not box.overlaps(other), (box, other)
    labels = [t.get_text() for a in figure.axes for t in a.get_xticklabels()]
    assert "\u2423Ein" in labels and not any("\u2581" in t for t in labels)
    assert any(t.endswith("\u2026") for t in labels)  # the long piece is cut
  assert attention_maps.tick_label("\u2581Fahrradfahrerinnenverein", 8) == "\u2423Fahrra\u2026"


def test_write_maps_writes_every_layer_and_the_asked_heads(tmp_path):
  maps = hand_built_maps()
  heads = attention_maps.parse_head("1:2", {"encoder_self": (2, 3), "cross": (2, 3)})
  assert heads == [("encoder_self", 1, 2), ("cross", 1, 2)]
  paths = attention_maps.write_maps(maps, str(tmp_path / "out"), heads, {"step": 7})
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(["overview.png", "encoder_self_layer0.png", "encoder_self_layer1.png",
                          "cross_layer0.png", "cross_layer1.png",
                          "encoder_self_layer1_head2.png", "cross_layer1_head2.png",
                          "stats.txt", "stats.json"])
  for p in paths:
    if p.endswith(".png"):
      file_png_size(p)
  with open(tmp_path / "out" / "stats.json", encoding="utf-8") as f:
    report = json.load(f)
  assert report["step"] == 7 and report["tokens"]["cross"]["queries"][0] == "t0"
  with pytest.raises(attention_maps.DataError, match="layers 0-1 and heads 0-2"):
    attention_maps.parse_head("cross:2:0", {"cross": (2, 3)})
  with pytest.raises(attention_maps.DataError, match="KIND one of cross"):
    attention_maps.parse_head("decoder_self:0:0", {"cross": (2, 3)})


# ----------------------------------------------------------------------------- end to end


def read_event_images(workdir):
  """{tag: (width, height, png bytes)} of the image summaries in the TensorBoard files."""
  out = {}
  directory = os.path.join(workdir, "tensorboard")
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[i + 12:i + 12 + length])
      i += 12 + length + 4
      for value in event.summary.value:
        if value.HasField("image"):
          out[value.tag] = (value.image.width, value.image.height,
                            value.image.encoded_image_string)
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A few steps of byte-level translation on real files, one attention image per eval."""
  root = tmp_path_factory.mktemp("attention")
  write_corpus(root / "corpus", {"train": 200, "val": 20, "test": 10})
  config = tiny_translation_config(
      root / "corpus", root / "tfds",
      train=dict(num_train_steps=10, checkpoint_every_steps=10, log_every_steps=10),
      eval=dict(eval_every_steps=10, best_metric="", num_attention_images=1),
      optim=dict(warmup_steps=5), model=dict(num_heads=2))
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir, devices=ONE_DEVICE, final_evaluation=False)
  return config, workdir


def test_evaluations_write_attention_images_and_statistics(trained):
  config, workdir = trained
  images = read_event_images(workdir)
  # One layer of each kind, 2 heads: one row of 2 thumbnails.
  sizes = {attention_maps.overview_pixels(1, 2, tokens) for tokens in range(1, 129)}
  for kind in attention_maps.KINDS:
    width, height, png = images[f"eval/attention/example_0/{kind}"]
    assert (width, height) == png_size(png) and (width, height) in sizes
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  evaluation = [r for r in records if "eval/loss" in r][-1]
  for kind in attention_maps.KINDS:
    assert 0 < evaluation[f"eval/attention/{kind}/peak"] <= 1
  assert len([k for k in evaluation if k.startswith("eval/attention/")]) == 3 * 6
  del config


def test_attention_mode_draws_a_sentence_and_its_reference(trained):
  config, workdir = trained
  source, reference = "hund sieht katze", "dog sees cat"
  result = run_main(*cli_flags(config, workdir), "--mode=attention", f"--prompt={source}",
                    f"--reference={reference}", "--attention_head=cross:0:1")
  assert result.returncode == 0, result.stderr[-3000:]
  directory = os.path.join(workdir, "attention", "latest-step10-hund-sieht-katze")
  assert os.path.join(directory, "overview.png") in result.stdout
  with open(os.path.join(directory, "stats.json"), encoding="utf-8") as f:
    report = json.load(f)
  src = list(source.replace(" ", "\u2423")) + ["</s>"]  # bytes: one piece per letter
  tgt = list(reference.replace(" ", "\u2423")) + ["</s>"]
  assert report["tokens"]["encoder_self"]["keys"] == src
  assert report["tokens"]["cross"] == {"queries": tgt, "keys": src}
  assert report["tokens"]["decoder_self"]["queries"] == ["<s>"] + tgt[:-1]
  assert set(report["statistics"]) == set(attention_maps.KINDS)
  expected = {"overview.png": attention_maps.overview_pixels(3, 2, 17),
              "encoder_self_layer0.png": attention_maps.layer_grid_pixels(2, 17, 17),
              "cross_layer0.png": attention_maps.layer_grid_pixels(2, 13, 17),
              "cross_layer0_head1.png": attention_maps.head_pixels(13, 17)}
  for name, size in expected.items():
    assert file_png_size(os.path.join(directory, name)) == size, name
  assert "cross" in result.stdout and "entropy" in result.stdout  # the statistics table


def test_attention_without_reference_and_head_importance(trained):
  config, workdir = trained
  paths, table = modes.attention_report(config, workdir, text="katze und hund")
  report = json.load(open(next(p for p in paths if p.endswith(".json")), encoding="utf-8"))
  translation = report["tokens"]["cross"]["queries"]  # the model's own output
  assert translation and report["tokens"]["decoder_self"]["queries"] == ["<s>"] + translation[:-1]
  assert "encoder_self" in table

  baseline, increase, paths = modes.head_importance(config, workdir, devices=ONE_DEVICE)
  assert np.isfinite(baseline) and {k: v.shape for k, v in increase.items()} == {
      kind: (1, 2) for kind in attention_maps.KINDS}
  assert any(abs(v).max() > 0 for v in increase.values())
  assert sorted(os.path.basename(p) for p in paths) == [
      f"head_importance-validation-latest-step10.{ext}" for ext in ("csv", "json", "md", "png")]
  png = next(p for p in paths if p.endswith(".png"))
  assert file_png_size(png) == attention_maps.importance_pixels([(1, 2)] * 3)
