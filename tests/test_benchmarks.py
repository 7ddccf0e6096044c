"""The benchmarks' own guards: the FLOP formula's matmul parameters equal each family's
model (plain, untied, [CLS] pooling, scanned layers), the encoder-only FLOPs against a hand
count, shape groups and the skipping of shapes whose feature is missing, and compile_time
compiling from nothing on every repetition even where the test set-up turned the
persistent compilation cache on."""

import jax
import pytest

from benchmarks import compile_time
from benchmarks import train_throughput as tt
from configs import default as default_config

LENGTH = 16


def _shape(task: str, **overrides) -> tt.Shape:
  lengths = {"translation": dict(src_length=LENGTH, tgt_length=LENGTH),
             "generation": dict(tgt_length=LENGTH),
             "classification": dict(src_length=LENGTH, tgt_length=0)}[task]
  return tt.Shape(f"test_{task}", task, "tiny", batch=2, overrides=overrides, **lengths)


FORMULA_CASES = [
    ("translation", {}),
    ("translation", dict(share_embeddings=False, tie_output=False)),  # output_kernel counted
    ("generation", {}),
    ("generation", dict(tie_output=False)),
    ("classification", {}),
    ("classification", dict(pooling="cls")),  # the [CLS] vector is not a matmul
]
if "scan_layers" in default_config.get_config().model:
  FORMULA_CASES += [(t, dict(scan_layers=True))
                    for t in ("translation", "generation", "classification")]


@pytest.mark.parametrize("task_name,overrides", FORMULA_CASES)
def test_flop_formula_counts_every_matmul_weight(task_name, overrides):
  shape = _shape(task_name, **overrides)
  config = tt.build_config(shape)
  task = tt.build_task(config, 0)
  tt.check_model_knobs(shape, config, task)
  params = jax.jit(task.init_params)(jax.random.PRNGKey(0))
  family = tt._family(task)  # pylint: disable=protected-access
  counts = tt.check_matmul_parameters(task.model.config, family, params)
  assert counts["matmul"] > 0
  if task_name == "classification":
    assert counts["decoder"] == 0 and counts["output_kernel"] == 0 and counts["head"] > 0


def test_encoder_only_flops_by_hand():
  config = tt.build_config(_shape("classification"))
  cfg = tt.build_task(config, 0).model.config
  d, f, n, classes = cfg.d_model, cfg.d_ff, cfg.num_encoder_layers, cfg.num_classes
  a = cfg.num_heads * cfg.head_dim
  batch, length = 3, 10
  per_layer = 4 * d * a + 2 * d * f
  expected = (6 * n * per_layer * batch * length  # encoder weights, every input token
              + 12 * n * a * length**2 * batch  # Q K^T and probs V
              + 6 * d * classes * batch)  # the head, once per example
  flops = tt.model_flops(cfg, "encoder-only", batch, length, 0)
  assert flops["total"] == expected
  assert flops["decoder"] == flops["output"] == flops["cross_attention"] == 0


def test_shape_groups_and_skips(monkeypatch):
  assert tt.GROUPS["default"][:2] == ["nanogpt", "nanogpt_fused"]  # BENCHMARKS.md's table
  names, skipped = tt.select_shapes("families,generation_tiny_256,translation_base_256_bf16")
  assert len(names) == len(set(names)) == 10 and not skipped
  assert names[-1] == "translation_base_256_bf16"
  with pytest.raises(SystemExit, match="unknown shape or group"):
    tt.select_shapes("families,no_such_shape")
  # An optional shape whose feature is missing: skipped from a group, an error when named.
  monkeypatch.setattr(tt, "missing_feature", lambda shape: "not built yet")
  optional = [s.name for s in tt.VARIANT_SHAPES if s.optional]
  names, skipped = tt.select_shapes("variants")
  assert [n for n, _ in skipped] == optional and not set(names) & set(optional)
  with pytest.raises(SystemExit, match="not built yet"):
    tt.select_shapes(optional[0])


def test_model_knob_that_does_not_reach_the_model_stops():
  shape = _shape("generation", dtype="bfloat16")
  config = tt.build_config(shape)
  task = tt.build_task(config, 0)
  tt.check_model_knobs(shape, config, task)  # reaches the model: fine
  with config.unlocked():
    config.compute.dtype = "float32"  # the model was built with bfloat16; the config now says not
  with pytest.raises(ValueError, match="dtype"):
    tt.check_model_knobs(shape, config, task)


@pytest.fixture
def restore_persistent_cache():
  """compile_time switches the persistent cache off for the process; the other tests of
  this worker get it back."""
  enabled = jax.config.jax_enable_compilation_cache
  yield
  jax.config.update("jax_enable_compilation_cache", enabled)
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  compilation_cache.reset_cache()  # decide again, under the restored setting


def test_compile_time_compiles_from_nothing_each_repetition(restore_persistent_cache):
  del restore_persistent_cache
  compile_time.disable_persistent_cache()
  args = compile_time.parse_args(["--quick", "--tasks=generation", "--layers=1",
                                  "--scan=no", "--reps=2", "--steps=1", "--length=16"])
  (case,) = compile_time.cases_of(args)
  row = compile_time.run_case(case, args.reps, args.steps, args.seed)
  first, second = row["compile_s_all"]
  # A cache hit (in memory or on disk) would return in milliseconds.
  assert second > 0.25 * first, row["compile_s_all"]
  assert row["step_s"] > 0 and row["layers"] == 1 and not row["scan_layers"]
