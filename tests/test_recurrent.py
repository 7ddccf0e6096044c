"""The recurrent reading of the encoder (models/recurrent.py, `model.encoder_lstm`) and
attention pooling, each against a NumPy statement of its math, with the padding and
packing properties every encoder layer keeps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import recurrent
from models.transformer import Classifier, Encoder, InvalidField
from tests.model_fixtures import init_params, tiny_model_config

RNG = np.random.default_rng(0)


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_lstm(x, w_x, b, w_h):
  """The textbook LSTM cell over one sequence `[length, d]`, one position at a time (gates
  i, f, g, o; the forget gate's bias +1), from zero state. Returns `[length, hidden]`."""
  hidden = w_h.shape[0]
  c, h, out = np.zeros(hidden), np.zeros(hidden), []
  for x_t in x:
    z = x_t @ w_x + b + h @ w_h
    i, f, g, o = z[:hidden], z[hidden:2 * hidden], z[2 * hidden:3 * hidden], z[3 * hidden:]
    c = np_sigmoid(f + 1) * c + np_sigmoid(i) * np.tanh(g)
    h = np_sigmoid(o) * np.tanh(c)
    out.append(h)
  return np.array(out)


def np_bilstm(x, p):
  """Forward LSTM over `x`, backward LSTM over `x` reversed (then put back in order),
  concatenated."""
  def run(name, seq):
    return np_lstm(seq, np.asarray(p[f"{name}_input"]["kernel"], np.float64),
                   np.asarray(p[f"{name}_input"]["bias"], np.float64),
                   np.asarray(p[f"{name}_recurrent"], np.float64))
  return np.concatenate([run("forward", x), run("backward", x[::-1])[::-1]], axis=-1)


def test_lstm_scan_is_the_textbook_cell_in_both_directions():
  x = RNG.normal(size=(2, 6, 4))
  w_x, b, w_h = RNG.normal(size=(4, 12)), RNG.normal(size=12), RNG.normal(size=(3, 12))
  gates = jnp.asarray(x @ w_x + b, jnp.float32)
  got = recurrent.lstm_scan(gates, jnp.asarray(w_h, jnp.float32))
  for row in range(2):
    np.testing.assert_allclose(got[row], np_lstm(x[row], w_x, b, w_h), rtol=1e-4, atol=1e-5)
  backward = recurrent.lstm_scan(gates, jnp.asarray(w_h, jnp.float32), reverse=True)
  np.testing.assert_allclose(backward[0], np_lstm(x[0, ::-1], w_x, b, w_h)[::-1], rtol=1e-4,
                             atol=1e-5)
  # A reset restarts the state: what follows it is a new sequence.
  reset = jnp.zeros((2, 6), bool).at[:, 3].set(True)
  restarted = recurrent.lstm_scan(gates, jnp.asarray(w_h, jnp.float32), reset)
  np.testing.assert_allclose(restarted[0, 3:], np_lstm(x[0, 3:], w_x, b, w_h), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(restarted[0, :3], got[0, :3], rtol=1e-6)


def test_segment_edges_mark_the_first_and_last_position_of_each_run():
  segments = jnp.array([[1, 1, 2, 2, 2, 0, 0]])
  starts, ends = recurrent.segment_edges(segments > 0, segments)
  assert starts.astype(int).tolist() == [[1, 0, 1, 0, 0, 1, 0]]
  assert ends.astype(int).tolist() == [[0, 1, 0, 0, 1, 0, 1]]


def test_bilstm_matches_numpy_and_ignores_padding_and_packing():
  """Each real run of a row (padded, or packed beside another) gets the states of the
  NumPy BiLSTM over that run alone; padding outputs zeros."""
  module = recurrent.BiLSTM(features=6)
  a, b = RNG.normal(size=(3, 4)), RNG.normal(size=(4, 4))
  packed = np.concatenate([a, b, np.zeros((1, 4))])[None].astype(np.float32)
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  params = init_params(module, packed, segments > 0, segments)
  assert params["forward_recurrent"].shape == (3, 12)
  got = module.apply({"params": params}, packed, segments > 0, segments)
  np.testing.assert_allclose(got[0, :3], np_bilstm(a, params), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got[0, 3:7], np_bilstm(b, params), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(got[0, 7], 0.0)
  # Unpacked: the real tokens of a padded row are one sequence, whatever the padding holds.
  padded = np.concatenate([a, RNG.normal(size=(5, 4))])[None].astype(np.float32)
  valid = jnp.arange(8)[None] < 3
  alone = module.apply({"params": params}, padded, valid)
  np.testing.assert_allclose(alone[0, :3], np_bilstm(a, params), rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(alone[0, 3:], 0.0)


def test_encoder_with_lstm_reads_both_ways_and_packs_like_separate_rows():
  """With encoder_lstm, the encoder's output at a position depends on the tokens after it
  too (the backward reading), and a packed row gives each sequence its outputs alone."""
  model = Encoder(tiny_model_config(encoder_lstm=True, positional_encoding="none"))
  a, b = [3, 4, 5], [6, 7, 8, 9]
  alone = jnp.array([a + [0] * 5, b + [0] * 4])
  params = init_params(model, alone)
  assert set(params["lstm"]) == {"forward_input", "forward_recurrent", "backward_input",
                                 "backward_recurrent"}
  out_alone = model.apply({"params": params}, alone)
  changed_last = model.apply({"params": params}, alone.at[0, 2].set(11))
  assert np.abs(np.asarray(changed_last[0, 0] - out_alone[0, 0])).max() > 1e-3
  packed = jnp.array([a + b + [0]])
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0]])
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  out_packed = model.apply({"params": params}, packed, positions, segments)
  np.testing.assert_allclose(out_packed[0, :3], out_alone[0, :3], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out_packed[0, 3:7], out_alone[1, :4], rtol=1e-4, atol=1e-5)


def test_stacked_lstms_each_read_the_states_of_the_one_below():
  """lstm_layers=2: the second bidirectional LSTM reads the first one's states (both
  directions concatenated), as NumPy's two readings one after the other; padding outputs
  zeros. One layer keeps the parameter names of before (a single "lstm")."""
  cfg = tiny_model_config(encoder_lstm=True, lstm_layers=2, num_encoder_layers=0,
                          positional_encoding="none", norm_placement="post")
  model = Encoder(cfg)
  inputs = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 0, 0, 0, 0]])
  params = init_params(model, inputs)
  assert set(params) == {"embed", "lstm", "lstm_2"}
  out = np.asarray(model.apply({"params": params}, inputs))
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  scale = np.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
  for row, n in enumerate((4, 2)):
    x = p["embed"]["embedding"][np.asarray(inputs[row, :n])] * scale
    want = np_bilstm(np_bilstm(x, p["lstm"]), p["lstm_2"])
    np.testing.assert_allclose(out[row, :n], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[row, n:], 0.0)
  one = init_params(Encoder(tiny_model_config(encoder_lstm=True, num_encoder_layers=0,
                                              positional_encoding="none")), inputs)
  assert set(one) == {"embed", "lstm"}


@pytest.mark.parametrize("pool_hidden", [0, 5])
def test_attention_pooling_is_a_softmax_over_real_tokens_of_tanh_scores(pool_hidden):
  """Classifier with pooling="attention": logits = head(sum_t w_t x_t), w = softmax over the
  real tokens of v . tanh(W x_t + c), W of pool_hidden units (0: d_model); padding weighs
  nothing, so padding more changes nothing."""
  cfg = tiny_model_config(pooling="attention", encoder_lstm=True, num_encoder_layers=1,
                          pool_hidden=pool_hidden)
  model = Classifier(cfg)
  inputs = jnp.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
  params = init_params(model, inputs)
  assert params["pool_hidden"]["kernel"].shape == (cfg.d_model, pool_hidden or cfg.d_model)
  logits = model.apply({"params": params}, inputs)
  x = np.asarray(Encoder(cfg).apply({"params": params["encoder"]}, inputs), np.float64)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  scores = np.tanh(x @ p["pool_hidden"]["kernel"] + p["pool_hidden"]["bias"]) \
      @ p["pool_score"]["kernel"][:, 0]
  scores = np.where(np.asarray(inputs) > 0, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  pooled = np.einsum("bl,bld->bd", weights, x)
  expected = pooled @ p["head"]["kernel"] + p["head"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  more_padding = model.apply({"params": params}, jnp.pad(inputs, ((0, 0), (0, 3))))
  np.testing.assert_allclose(more_padding, logits, rtol=1e-5, atol=1e-6)


def test_max_pooling_takes_each_features_maximum_over_real_tokens():
  """Classifier with pooling="max": logits = head(max_t x_t) over the real tokens only
  (padding states, here the LSTM's zeros, never win even where every real state is
  negative); a row without tokens pools to 0, leaving the head's bias."""
  cfg = tiny_model_config(pooling="max", encoder_lstm=True, num_encoder_layers=0,
                          positional_encoding="none", norm_placement="post")
  model = Classifier(cfg)
  inputs = jnp.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10], [0, 0, 0, 0, 0]])
  params = init_params(model, inputs)
  logits = np.asarray(model.apply({"params": params}, inputs))
  x = np.asarray(Encoder(cfg).apply({"params": params["encoder"]}, inputs), np.float64)
  head = jax.tree.map(lambda v: np.asarray(v, np.float64), params["head"])
  pooled = np.stack([x[0, :3].max(axis=0), x[1].max(axis=0), np.zeros(cfg.d_model)])
  assert (x[0, :3].max(axis=0) < 0).any()  # features whose padding zeros would have won
  np.testing.assert_allclose(logits, pooled @ head["kernel"] + head["bias"], rtol=1e-4,
                             atol=1e-5)


def test_head_hidden_is_a_tanh_layer_with_dropout_before_the_logits():
  """Classifier with head_hidden=H: logits = head(tanh(W pooled + c)), W of H units; in
  training the head reads the tanh layer's output through dropout (each unit 0 or scaled
  by 1 / keep); head_hidden=0 has no such layer."""
  cfg = tiny_model_config(pooling="mean", head_hidden=5)
  model = Classifier(cfg)
  inputs = jnp.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
  params = init_params(model, inputs)
  assert params["head_hidden"]["kernel"].shape == (cfg.d_model, 5)
  assert params["head"]["kernel"].shape == (5, cfg.num_classes)
  logits = np.asarray(model.apply({"params": params}, inputs))
  x = np.asarray(Encoder(cfg).apply({"params": params["encoder"]}, inputs), np.float64)
  real = (np.asarray(inputs) > 0)[..., None]
  pooled = (x * real).sum(1) / real.sum(1)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  hidden = np.tanh(pooled @ p["head_hidden"]["kernel"] + p["head_hidden"]["bias"])
  np.testing.assert_allclose(logits, hidden @ p["head"]["kernel"] + p["head"]["bias"],
                             rtol=1e-4, atol=1e-5)
  assert "head_hidden" not in init_params(Classifier(tiny_model_config()), inputs)
  dropped = Classifier(dataclasses.replace(cfg, dropout_rate=0.5))
  train_logits, state = dropped.apply(
      {"params": params}, inputs, deterministic=False, capture_intermediates=True,
      rngs={"dropout": jax.random.PRNGKey(1)})
  inner = state["intermediates"]
  hidden = np.tanh(np.asarray(inner["head_hidden"]["__call__"][0], np.float64))
  read = np.asarray(inner["Dropout_1"]["__call__"][0], np.float64)  # what the head read
  kept = read != 0
  assert 0 < kept.sum() < kept.size  # some units dropped, some kept
  np.testing.assert_allclose(read[kept], hidden[kept] / 0.5, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(train_logits, read @ p["head"]["kernel"] + p["head"]["bias"],
                             rtol=1e-4, atol=1e-5)


def test_embed_dim_projects_narrower_embeddings_to_d_model():
  """embed_dim=E: the embedding table is E wide; with blocks, x = (table[ids] sqrt(E)) P
  (P E x d_model, no bias) is what they read (here no blocks and mean pooling, so the
  logits show it); an LSTM's input layer reads the E-wide embeddings directly; masked-token
  logits take the encoder's output back to E (token_proj) before the tied table.
  embed_init_std sets the table's initial stddev."""
  cfg = tiny_model_config(pooling="mean", num_encoder_layers=0, num_decoder_layers=0,
                          positional_encoding="none", embed_dim=6)
  model = Classifier(cfg)
  inputs = jnp.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 10]])
  params = init_params(model, inputs)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  table, proj = p["encoder"]["embed"]["embedding"], p["encoder"]["embed_proj"]["kernel"]
  assert table.shape == (cfg.vocab_size, 6) and proj.shape == (6, cfg.d_model)
  x = table[np.asarray(inputs)] * np.sqrt(6) @ proj
  real = (np.asarray(inputs) > 0)[..., None]
  pooled = (x * real).sum(1) / real.sum(1)
  np.testing.assert_allclose(model.apply({"params": params}, inputs),
                             pooled @ p["head"]["kernel"] + p["head"]["bias"],
                             rtol=1e-4, atol=1e-5)
  # Masked-token logits: (encoder output) token_proj table^T.
  token_params = model.init(jax.random.PRNGKey(1), inputs, token_logits=True)["params"]
  assert token_params["token_proj"]["kernel"].shape == (cfg.d_model, 6)
  t = jax.tree.map(lambda v: np.asarray(v, np.float64), token_params)
  x = t["encoder"]["embed"]["embedding"][np.asarray(inputs)] * np.sqrt(6)
  x = x @ t["encoder"]["embed_proj"]["kernel"] @ t["token_proj"]["kernel"]
  np.testing.assert_allclose(
      model.apply({"params": token_params}, inputs, token_logits=True),
      x @ t["encoder"]["embed"]["embedding"].T, rtol=1e-4, atol=1e-5)
  # The LSTM reads the E-wide embeddings itself: no projection.
  lstm = tiny_model_config(pooling="mean", num_encoder_layers=0, num_decoder_layers=0,
                           positional_encoding="none", encoder_lstm=True, embed_dim=6)
  shapes = jax.eval_shape(Classifier(lstm).init, jax.random.PRNGKey(0), inputs)["params"]
  assert "embed_proj" not in shapes["encoder"]
  assert shapes["encoder"]["lstm"]["forward_input"]["kernel"].shape == (6, 4 * 8)
  assert shapes["encoder"]["embed"]["embedding"].shape == (cfg.vocab_size, 6)
  # The initial table's stddev: embed_init_std, or the width^-1/2.
  wide = dict(vocab_size=4000, num_encoder_layers=0, num_decoder_layers=0, embed_dim=64)
  for std, want in ((0.0, 64**-0.5), (0.1, 0.1)):
    table = Classifier(tiny_model_config(**wide, embed_init_std=std)).init(
        jax.random.PRNGKey(0), inputs)["params"]["encoder"]["embed"]["embedding"]
    assert abs(float(jnp.std(table)) / want - 1) < 0.02  # 256,000 draws


@pytest.mark.parametrize("fields,field", [
    # A language model has no encoder (a classifier's embeddings are one, blocks or not).
    (dict(encoder_lstm=True, num_encoder_layers=0, num_classes=0), "encoder_lstm"),
    (dict(encoder_lstm=True, d_model=15, num_heads=3, head_dim=0,
          positional_encoding="none"), "d_model"),  # two directions of d_model / 2
    (dict(encoder_lstm=1), "encoder_lstm"),
    (dict(encoder_lstm=True, lstm_layers=0), "lstm_layers"),
    (dict(lstm_layers=2), "lstm_layers"),  # no LSTM to stack
    (dict(pooling="min"), "pooling"),
    (dict(head_hidden=-1), "head_hidden"),
    (dict(head_hidden=8, num_classes=0), "head_hidden"),  # a language model has no head
    (dict(embed_dim=8, num_classes=0), "embed_dim"),  # only classifiers project them
    (dict(pool_hidden=8), "pool_hidden"),  # mean pooling has no scoring layer
    (dict(pool_hidden=-1, pooling="attention"), "pool_hidden"),
    (dict(embed_dim=-1), "embed_dim"),
    (dict(embed_init_std=-0.1), "embed_init_std"),
    (dict(embed_init_std=True), "embed_init_std"),
])
def test_impossible_settings_name_the_field(fields, field):
  with pytest.raises(InvalidField) as error:
    tiny_model_config(**fields)
  assert error.value.field == field
