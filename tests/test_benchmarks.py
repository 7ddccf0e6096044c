"""The benchmarks' own guards: the FLOP formula's matmul parameters equal each family's
model (plain, untied, [CLS] pooling, scanned layers), the encoder-only FLOPs against a hand
count, shape groups and the skipping of shapes whose feature is missing, and compile_time
compiling from nothing on every repetition even where the test set-up turned the
persistent compilation cache on; the per-op profile's HLO parsing, self times and a tiny
run."""

import os

import jax
import pytest

from benchmarks import compile_time, profile_step
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


def test_gpt2_small_shape_is_nanogpts_bench_model():
  """The GPU shape that is compared with nanoGPT's bench.py has its parameter count (no
  biases, layer norms with a scale only, tied output, learned positions; our position
  table has one row more than the context) and passes the FLOP formula's check."""
  shape = tt.SHAPES_BY_NAME["gpt2_small"]
  assert shape.peer == "nanogpt_bench" and shape.batch == 12 and shape.tgt_length == 1024
  config = tt.build_config(shape)
  task = tt.build_task(config, shape.vocab_size)
  tt.check_model_knobs(shape, config, task)
  params = jax.eval_shape(task.init_params, jax.random.PRNGKey(0))
  counts = tt.check_matmul_parameters(task.model.config, "decoder-only", params)
  d, layers, vocab = 768, 12, 50304
  nanogpt = layers * (12 * d * d + 2 * d) + vocab * d + 1024 * d + d  # weights + ln scales
  assert counts["total"] == nanogpt + d
  assert tt.select_shapes("gpu")[0] == tt.GROUPS["gpu"]
  assert not set(tt.GROUPS["gpu"]) & set(tt.GROUPS["all"])  # never run on the CPU by "all"


def test_peer_output_parsing():
  """The lines nanoGPT's train.py and bench.py print, read back."""
  from benchmarks import peers  # pylint: disable=g-import-not-at-top
  out = ("step 0: train loss 4.2, val loss 4.2\niter 0: loss 4.1877, time 2267.44ms, mfu -100.00%\n"
         "iter 1: loss 3.9, time 38.70ms, mfu 0.04%\nsaving checkpoint\n")
  assert peers.iteration_ms(out) == [2267.44, 38.7]
  assert peers.evaluation("step 250: train loss 1.9734, val loss 2.0653") == {
      "step": 250, "val_loss": 2.0653}
  assert peers.evaluation("iter 250: loss 1.9, time 3.1ms, mfu 1%") is None
  assert peers.BENCH.search("time per iteration: 26.5012ms, MFU: 40.12%").group(1) == "26.5012"


def test_loop_rate_leaves_out_the_first_interval():
  from benchmarks import loop_speed  # pylint: disable=g-import-not-at-top
  records = [{"step": 50, "time": 100.0, "train/loss": 3.0},
             {"step": 50, "time": 101.0, "eval/loss": 3.0},  # not a training record
             {"step": 100, "time": 102.0, "train/loss": 2.0},
             {"step": 150, "time": 104.5, "train/loss": 1.0}]
  rate = loop_speed.loop_rate(records)
  assert rate["steps"] == 100 and rate["seconds"] == pytest.approx(4.5)
  with pytest.raises(SystemExit, match="fewer than 2"):
    loop_speed.loop_rate(records[:2])


def test_early_cpu_devices_flag():
  from benchmarks import run_record  # pylint: disable=g-import-not-at-top
  assert run_record.early_int_flag(["--shapes=x", "--cpu_devices=2"], "cpu_devices") == 2
  assert run_record.early_int_flag(["--cpu_devices", "4"], "cpu_devices") == 4
  assert run_record.early_int_flag(["--cpu_devices_x=4"], "cpu_devices") == 0
  flags = "--xla_force_host_platform_device_count=8 --xla_foo=1"
  assert run_record.cpu_device_flags(2, flags) == (
      "--xla_foo=1 --xla_force_host_platform_device_count=2")
  assert run_record.cpu_device_flags(0, flags) == "--xla_foo=1"


def test_gpu_report_table(tmp_path):
  """Ratios from the step, loop and recipe JSON files; a missing file is named."""
  from benchmarks import gpu_report, run_record  # pylint: disable=g-import-not-at-top
  row = {"shape": "gpt2_small", "batch": 12, "tokens_per_sec": 500000.0,
         "peer_tokens_per_sec": 400000.0, "mfu_published": 0.4, "mfu_measured": 0.5}
  run_record.write_json(str(tmp_path / "gpu_mfu.json"), {
      "device": "H200", "measured_peak_flops_per_sec": 7e14,
      "published_peak_flops_per_sec": 9.89e14, "rows": [row]})
  run_record.write_json(str(tmp_path / "recipe_ours.json"), {
      "target": 1.47, "reached_target_at": {"step": 1500, "wall_s": 60.0}})
  run_record.write_json(str(tmp_path / "recipe_nanogpt.json"), {
      "target": 1.47, "reached": {"step": 1500, "wall_s": 80.0}})
  os.makedirs(tmp_path / "profile")
  run_record.write_json(str(tmp_path / "profile" / "profiles.json"), {"profiles": [{
      "shape": "gpt2_small", "step_ms": 40.0, "busy_ms": 36.0,
      "kinds": [{"kind": "matmul", "share_of_op_time": 0.6},
                {"kind": "elementwise (fused)", "share_of_op_time": 0.25}]}]})
  text = "\n".join(gpu_report.table(str(tmp_path)))
  assert "| profile, gpt2_small: step 40.00 ms, 90.0% busy; op time by kind | matmul 60.0%, " \
         "elementwise (fused) 25.0% |" in text
  assert "| 500,000 | 400,000 | 1.25x |" in text
  assert "40.0%; 50.0%" in text
  assert "60 s (step 1500) | 80 s (step 1500) | 0.75x time |" in text
  assert "not in" in text and "loop_speed.json" in text


def test_sst2_tune_split_holds_out_whole_sentences_and_every_part_of_them(tmp_path):
  from benchmarks import sst2_tune_split
  sentences = [f"the film w{i} is good and the cast works hard x{i}" for i in range(6)]
  rows = [(s, str(i % 2)) for i, s in enumerate(sentences)]
  # Sub-phrases of the sentences, as SST-2 lists them, and a short unrelated phrase.
  rows += [(" ".join(s.split()[2:5]), "1") for s in sentences] + [("the film", "1"),
                                                                   ("dull", "0")]
  train, tune = sst2_tune_split.split(rows, num_tune=2, min_words=10, seed=0)
  assert len(tune) == 2 and set(tune) <= set(rows[:6])  # only whole (maximal) sentences
  held = set().union(*(sst2_tune_split.word_spans(s) for s, _ in tune))
  assert not any(s in held for s, _ in train)  # nothing of a tune sentence is trained on
  assert ("dull", "0") in train and len(train) == len(rows) - 2 - 2 - 1  # "the film" too
  assert train == [r for r in rows if r in train]  # the kept rows keep their order
  # The command writes the files main.py reads (train.tsv, dev.tsv).
  source = tmp_path / "sst2"
  source.mkdir()
  sst2_tune_split.write_rows(str(source / "train.tsv"), rows)
  sst2_tune_split.main([f"--data_dir={source}", f"--out={tmp_path / 'out'}", "--num_tune=2"])
  assert sst2_tune_split.read_rows(str(tmp_path / "out" / "dev.tsv")) == tune
  assert sst2_tune_split.read_rows(str(tmp_path / "out" / "train.tsv")) == train


def test_sst2_bilstm_reads_rows_backward():
  """benchmarks/sst2_bilstm.py: the backward reading reverses only the real positions (its
  LSTM recurrence is models/recurrent.lstm_scan, tested in tests/test_recurrent.py)."""
  import numpy as np
  from benchmarks import sst2_bilstm
  x = np.array([[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]])[..., None]
  flipped = sst2_bilstm.reverse_real(x, np.array([3, 5]))[..., 0]
  np.testing.assert_array_equal(flipped, [[3, 2, 1, 0, 0], [8, 7, 6, 5, 4]])
  np.testing.assert_array_equal(
      sst2_bilstm.reverse_real(flipped[..., None], np.array([3, 5]))[..., 0], x[..., 0])


def test_sst2_bilstm_learns_a_separable_corpus(tmp_path):
  """A short run of the baseline's command on a synthetic SST-2-shaped corpus scores it."""
  import json
  from benchmarks import sst2_bilstm
  from tests.test_classification import write_corpus
  write_corpus(tmp_path / "sst2", sizes=(("train", 600), ("dev", 64)))
  out = tmp_path / "run.json"
  sst2_bilstm.main([f"--data_dir={tmp_path / 'sst2'}", "--steps=60", "--eval_every=30",
                    "--min_count=1", f"--output={out}"])
  records = json.loads(out.read_text())["evaluations"]
  assert [r["step"] for r in records] == [30, 60]
  assert records[-1]["accuracy"] >= 0.9, records


@pytest.mark.parametrize("name", ["translation_small_256", "generation_small_256",
                                  "classification_small_256"])
def test_matmul_bound_lists_the_products_the_flop_formula_counts(name):
  """benchmarks/matmul_bound.py times the step's own matmuls: their FLOPs must be the model
  FLOPs of train_throughput.model_flops (less the classifier head on pooled vectors), or
  its bound would be about another step."""
  from benchmarks import matmul_bound
  shape = tt.SHAPES_BY_NAME[name]
  config = tt.build_config(shape)
  task = tt.build_task(config, 0)
  expected = tt.model_flops(task.model.config, tt._family(task),  # pylint: disable=protected-access
                            shape.batch, shape.src_length, shape.tgt_length)
  listed = sum(2.0 * b * m * k * n * count
               for (b, m, k, n, _), count in matmul_bound.products(config, shape).items())
  assert listed == pytest.approx(expected["total"] - expected["head"], rel=1e-9)
  assert all(split in ("b", "m", "k") for *_, split in matmul_bound.products(config, shape))


# ----------------------------------------------------------------------------- profile_step

_HLO = """HloModule jit_step, is_scheduled=true

%fused_computation.1 (param_0: f32[4,8], param_1: f32[8,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,8]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.1: f32[4,8]) -> f32[4] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%param_0.1, %constant.1), dimensions={1}, to_apply=%add
}

ENTRY %main.9 (p0: f32[4,8], p1: f32[8,8]) -> (f32[4], f32[4,8]) {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  %ynn_fusion.1 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kOutput, calls=%fused_computation.1, metadata={op_name="jit(_fun)/transpose(jvp(DecoderOnly))/decoder/block_3/ffn/wo/dot_general"}
  %reduce_fusion = f32[4]{0} fusion(%ynn_fusion.1), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(_fun)/jvp(DecoderOnly)/decoder/block_0/self_attention_norm/reduce_sum"}
  %custom-call.7 = (bf16[4,8]{1,0}, s8[0]{0}) custom-call(%p0, %p1), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(_fun)/jvp(DecoderOnly)/decoder/block_0/self_attention/dot_product_attention"}
  %all-reduce.2 = f32[8,8]{1,0} all-reduce(%p1), replica_groups={}, to_apply=%add, metadata={op_name="jit(_fun)/psum"}
  %conditional.4 = (f32[8,8]) conditional(%p0), branch_computations={%a, %b}, metadata={op_name="jit(_fun)/cond"}
  ROOT %tuple.5 = (f32[4], f32[4,8]{1,0}) tuple(%reduce_fusion, %ynn_fusion.1)
}
"""


def test_profile_parses_hlo_into_op_kinds_and_model_parts():
  instructions, computations = profile_step.parse_hlo(_HLO)
  kinds = {name: profile_step.op_kind(name, instructions, computations)
           for name in ("ynn_fusion.1", "reduce_fusion", "custom-call.7", "all-reduce.2",
                        "conditional.4", "dot.3", "nothing.1")}
  assert kinds == {"ynn_fusion.1": "matmul (fused)", "reduce_fusion": "reduction (fused)",
                   "custom-call.7": "attention (fused kernel)", "all-reduce.2": "collective",
                   "conditional.4": "control", "dot.3": "matmul", "nothing.1": "unknown"}
  parts = {name: profile_step.model_part(instructions[name].op_name)
           for name in ("ynn_fusion.1", "reduce_fusion", "custom-call.7", "all-reduce.2",
                        "conditional.4")}
  assert parts == {"ynn_fusion.1": "backward feed-forward", "reduce_fusion": "forward norms",
                   "custom-call.7": "forward attention", "all-reduce.2": "gradient all-reduce",
                   "conditional.4": "optimizer update"}


def test_profile_self_times_and_per_step_sums():
  """Two steps on one device thread: a conditional spanning a fusion (listed apart, its
  body not counted twice), a matmul fusion, and device 1's ops left out."""
  instructions, computations = profile_step.parse_hlo(_HLO)

  def op(name, ts, dur, device="0", tid=1):
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": name, "device_ordinal": device}}

  events = [{"ph": "X", "pid": 1, "tid": 9, "ts": 0, "dur": 1000,
             "name": profile_step.STEP_EVENT},
            {"ph": "X", "pid": 1, "tid": 9, "ts": 1000, "dur": 1200,
             "name": profile_step.STEP_EVENT}]
  for start in (0, 1000):
    events += [op("ynn_fusion.1", start + 0, 300),
               op("conditional.4", start + 400, 500),
               op("reduce_fusion", start + 500, 200),  # inside the conditional
               op("ynn_fusion.1", start + 0, 900, device="1", tid=2)]
  s = profile_step.summarize(events, instructions, computations, steps=2, top=10)
  assert s["source"] == "hlo_op" and s["step_ms"] == pytest.approx(1.1)
  rows = {r["op"]: r for r in s["ops"]}
  assert rows["ynn_fusion.1"]["ms"] == pytest.approx(0.3)  # device 1's 0.9 ms not counted
  assert rows["reduce_fusion"]["ms"] == pytest.approx(0.2)
  assert rows["ynn_fusion.1"]["calls"] == 1
  assert [r["op"] for r in s["control"]] == ["conditional.4"]
  assert s["control"][0]["ms"] == pytest.approx(0.3)  # its 0.5 ms less the nested 0.2
  assert s["op_ms"] == pytest.approx(0.5)
  assert s["busy_ms"] == pytest.approx(0.8)  # 0-300 and 400-900 a step
  assert {k["kind"]: round(k["share_of_op_time"], 3) for k in s["kinds"]} == {
      "matmul (fused)": 0.6, "reduction (fused)": 0.4}
  # Device 0 idles 300-400 and 900-1000 in step 1, 1300-1400 and 1900-2200 in step 2;
  # device 1's fusion (0-900, 1000-1900) runs through the first and third.
  gaps = [(round(g["ms"], 6), g["after"], g["before"], g["other_devices"]) for g in s["gaps"]]
  assert gaps == [(0.3, "conditional.4", "", []),
                  (0.1, "ynn_fusion.1", "conditional.4", ["ynn_fusion.1"]),
                  (0.1, "conditional.4", "ynn_fusion.1", []),
                  (0.1, "ynn_fusion.1", "conditional.4", ["ynn_fusion.1"])]
  assert s["idle_share_with_other_devices_busy"] == pytest.approx(0.2 / 0.6)


def test_profile_step_runs_on_a_tiny_shape(tmp_path):
  summaries = profile_step.main(["--shapes=nanogpt", "--tiny", "--steps=2", "--warmup=1",
                                 f"--out={tmp_path}"])
  s = summaries[0]
  assert s["source"] == "hlo_op" and s["steps"] == 2 and s["step_ms"] > 0
  assert 0 < s["busy_ms"] <= 2 * s["step_ms"] and s["op_ms"] > 0
  kinds = {k["kind"] for k in s["kinds"]}
  assert "matmul (fused)" in kinds or "matmul" in kinds
  assert any(p["part"].startswith("backward") for p in s["parts"])
  assert (tmp_path / "nanogpt" / "hlo.txt").read_text().startswith("HloModule")
  assert (tmp_path / "profiles.json").exists()
