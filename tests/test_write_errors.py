"""Writes that fail (a full disk, a path through a file) end in one WriteError line that
names the path, the cause and what is intact, and leave nothing half-written; the places a
run will write are tried before its compute.

We run as root, so a read-only directory is not one: the faults are real ones instead, a
path whose parent is a regular file (ENOTDIR), RLIMIT_FSIZE in a subprocess with SIGXFSZ
ignored (EFBIG stands in for ENOSPC), or the OS call made to raise ENOSPC.
"""

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

import errors
import files
import modes
import train
from benchmarks import fault_injection
from benchmarks.run_record import cpu_device_flags
from input_pipeline import local_builders, sources, tokenizers
from inspection import attention_maps
from tests.cli_helpers import REPO, assert_one_error_line, run_main
from tests.tiny_configs import tiny_config
from training import monitors, reporting, steps

NO_SPACE = os.strerror(errno.ENOSPC)
TOO_LARGE = os.strerror(errno.EFBIG)


def _no_space(*args, **kwargs):
  raise OSError(errno.ENOSPC, NO_SPACE)


def _blocker(tmp_path):
  """A regular file: any path below it fails with ENOTDIR."""
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  return path


def _limited(code: str, limit: int, **env) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh Python whose files may not grow past `limit` bytes (SIGXFSZ
  ignored, so a write past it fails with EFBIG as a full disk fails with ENOSPC)."""
  prelude = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             f"sys.path.insert(0, {REPO!r}); "
             f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n")
  environment = dict(os.environ, JAX_PLATFORMS="cpu", **env)
  environment["XLA_FLAGS"] = cpu_device_flags(0, environment.get("XLA_FLAGS", ""))
  return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO,
                        env=environment, capture_output=True, text=True, timeout=300)


def _tfrecords(path: str):
  """The records of a TFRecord file, every length and CRC checked (a torn record fails)."""
  with open(path, "rb") as f:
    data = f.read()
  out, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    assert struct.unpack("<I", data[offset + 8:offset + 12])[0] == masked_crc32c(header)
    record = data[offset + 12:offset + 12 + length]
    assert len(record) == length, "a torn record"
    crc = data[offset + 12 + length:offset + 16 + length]
    assert struct.unpack("<I", crc)[0] == masked_crc32c(record)
    out.append(event_pb2.Event.FromString(record))
    offset += 16 + length
  return out


# ----------------------------------------------------------------------------- files.py


def test_a_full_disk_keeps_the_earlier_file_whole_and_leaves_no_temporary(tmp_path,
                                                                           monkeypatch):
  path = tmp_path / "config.json"
  files.write_atomically(str(path), "old\n")
  monkeypatch.setattr(files.os, "fsync", _no_space)
  with pytest.raises(errors.WriteError) as raised:
    files.write_atomically(str(path), "new\n" * 1000)
  assert str(raised.value).startswith(f"cannot write {path} ({NO_SPACE}); the earlier file "
                                      f"there is unchanged;")
  assert path.read_text() == "old\n"
  assert os.listdir(tmp_path) == ["config.json"]
  with pytest.raises(errors.WriteError, match="no part of it was written"):
    files.write_atomically(str(tmp_path / "new.json"), "{}")
  assert os.listdir(tmp_path) == ["config.json"]


def test_a_path_through_a_file_names_that_file(tmp_path):
  blocker = _blocker(tmp_path)
  target = blocker / "deeper" / "labels.json"
  with pytest.raises(errors.WriteError) as raised:
    files.write_atomically(str(target), "{}")
  assert f"cannot write {target} (Not a directory: {blocker} is a file)" in str(raised.value)
  # A directory that exists as a file is named the same way.
  with pytest.raises(errors.WriteError, match=f"Not a directory: {blocker} is a file"):
    files.check_writable(str(blocker))
  assert blocker.read_text() == "not a directory"


def test_check_writable_tries_the_place_and_leaves_nothing(tmp_path, monkeypatch):
  directory = tmp_path / "run" / "eval"
  assert files.check_writable(str(directory)) == str(directory)
  assert directory.is_dir() and os.listdir(directory) == []
  monkeypatch.setattr(files.os, "fsync", _no_space)
  with pytest.raises(errors.WriteError) as raised:
    files.check_writable(str(directory))
  assert str(raised.value).startswith(
      f"cannot write {directory} ({NO_SPACE}); nothing has been written there yet;")
  assert os.listdir(directory) == []


def test_checked_translates_os_errors_that_writers_report_and_nothing_else(tmp_path):
  # array_record (under tfds) reports a failed write as a RuntimeError with errno's text.
  with pytest.raises(errors.WriteError) as raised:
    with files.checked("/data/x", "no partial data is left"):
      raise RuntimeError('Failed to finalize writing of split "train": write() failed: '
                         'File too large; writing /data/x/train.array_record')
  assert str(raised.value).startswith(f"cannot write /data/x ({TOO_LARGE}); no partial "
                                      "data is left;")
  with pytest.raises(RuntimeError, match="a bug") as raised:
    with files.checked("/data/x", "-"):
      raise RuntimeError("a bug")
  assert not isinstance(raised.value, errors.UserError)
  with pytest.raises(tokenizers.TokenizerError, match="already one line"):
    with files.checked("/data/x", "-"):
      raise tokenizers.TokenizerError("already one line")


def test_appender_cuts_a_record_that_did_not_fit(tmp_path, monkeypatch):
  path = tmp_path / "metrics.jsonl"
  appender = files.Appender(str(path), "its earlier records are intact")
  appender.append(b'{"step": 1}\n')
  writes = []

  def half_then_full(fd, data):  # the disk fills in the middle of the record
    if writes:
      raise OSError(errno.ENOSPC, NO_SPACE)
    writes.append(len(data) // 2)
    return os.pwrite(fd, bytes(data[:len(data) // 2]), os.fstat(fd).st_size)

  monkeypatch.setattr(files.os, "write", half_then_full)
  with pytest.raises(errors.WriteError) as raised:
    appender.append(b'{"step": 2, "loss": 1.0}\n')
  monkeypatch.undo()
  assert writes, "the record was not half-written first"
  assert str(raised.value).startswith(f"cannot write {path} ({NO_SPACE}); its earlier "
                                      "records are intact;")
  assert path.read_bytes() == b'{"step": 1}\n'
  appender.append(b'{"step": 3}\n')  # once there is room, it goes on
  appender.close()
  assert path.read_bytes() == b'{"step": 1}\n{"step": 3}\n'


# ----------------------------------------------------------------------------- metrics


def _nearly_full(path, limit: int, room: int = 40) -> bytes:
  """Writes whole JSON lines of padding to `path`, `room` bytes short of `limit` (less
  than any metrics record); returns them."""
  line = json.dumps({"step": 0, "pad": "x" * 1000}).encode() + b"\n"
  padding = line * ((limit - room) // len(line) - 1)
  rest = limit - room - len(padding) - len(json.dumps({"step": 0, "pad": ""})) - 1
  padding += json.dumps({"step": 0, "pad": "x" * rest}).encode() + b"\n"
  assert len(padding) == limit - room
  path.write_bytes(padding)
  return padding


_WRITE_METRICS = """
import json
from errors import WriteError
from training import reporting
writer = reporting.MetricWriter({workdir!r})
done = 0
try:
  for step in range(1, 10000):
    writer.write_scalars(step, {{"train/loss": 1.0 / step, "train/accuracy": 0.5}})
    writer.write_text(step, "eval/examples", "input: 1 2 3  prediction: 3 2 1")
    done = step
except WriteError as e:
  print(json.dumps({{"done": done, "error": str(e)}}))
writer.close()
"""


@pytest.mark.parametrize("full", ["tensorboard", "metrics.jsonl"])
def test_a_full_disk_under_the_metric_writer_keeps_whole_records(tmp_path, full):
  """TensorBoard events and metrics.jsonl written until a file may grow no more (the
  events file grows faster; metrics.jsonl is made nearly full first for its case): one
  WriteError names the file, both files hold only whole records, and a resumed writer
  appends valid records after them."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  limit = 20_000
  padding = _nearly_full(workdir / "metrics.jsonl", limit) if full == "metrics.jsonl" else b""
  result = _limited(_WRITE_METRICS.format(workdir=str(workdir)), limit)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["error"].startswith(f"cannot write {workdir / full}") or (
      full == "tensorboard" and f"{workdir / 'tensorboard'}/events.out.tfevents." in
      report["error"]), report["error"]
  assert f"({TOO_LARGE}); its earlier records are intact" in report["error"]

  data = (workdir / "metrics.jsonl").read_bytes()
  assert data.startswith(padding) and data.endswith(b"\n")
  steps_written = [json.loads(line)["step"] for line in data[len(padding):].splitlines()]
  done = report["done"]
  assert steps_written in (list(range(1, done + 1)), list(range(1, done + 2)))
  [events_file] = os.listdir(workdir / "tensorboard")
  events = _tfrecords(str(workdir / "tensorboard" / events_file))
  assert events[0].file_version == "brain.Event:2"
  assert max(e.step for e in events) in (done, done + 1)

  writer = reporting.MetricWriter(str(workdir))  # room again: the run resumes writing
  writer.write_scalars(done + 5, {"train/loss": 0.5})
  writer.close()
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    assert json.loads(f.readlines()[-1])["step"] == done + 5
  for name in os.listdir(workdir / "tensorboard"):
    _tfrecords(str(workdir / "tensorboard" / name))


def test_a_full_disk_while_training_writes_metrics_is_one_line_and_resumes(tmp_path):
  """metrics.jsonl is made nearly as large as files may grow: the first progress line's
  record does not fit. The run stops with one line naming it; its earlier records and the
  checkpoint saved before are intact; the same command resumes once there is room."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  limit = 2_000_000  # far above any file of the tiny model's checkpoints
  padding = _nearly_full(workdir / "metrics.jsonl", limit)
  flags = [f"--workdir={workdir}", "--config.train.num_train_steps=20",
           "--config.train.checkpoint_every_steps=5", "--config.train.log_every_steps=10",
           "--config.eval.eval_every_steps=1000", "--config.model.d_model=32",
           "--config.model.d_ff=64", "--config.model.num_heads=2",
           "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
           "--config.data.max_digits=5", "--config.data.max_input_length=8",
           "--config.data.max_target_length=8", "--config.train.batch_size=16",
           "--config.eval.num_print_examples=0", "--config.eval.num_attention_images=0",
           "--config.data.num_eval_examples=64"]
  result = _limited(f"import runpy; sys.argv = ['main.py'] + {flags!r}; "
                    f"runpy.run_path({os.path.join(REPO, 'main.py')!r}, run_name='__main__')",
                    limit)
  assert_one_error_line(result, f"cannot write {workdir / 'metrics.jsonl'} ({TOO_LARGE})",
                        "its earlier records are intact")
  assert (workdir / "metrics.jsonl").read_bytes() == padding
  assert fault_injection.readable_steps(str(workdir)) == [5]

  resumed = run_main(*flags)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert fault_injection.readable_steps(str(workdir))[-1] == 20
  data = (workdir / "metrics.jsonl").read_bytes()
  records = [json.loads(line) for line in data[len(padding):].splitlines()]
  assert data.startswith(padding) and records[0]["step"] == 10


# ----------------------------------------------------------------------------- data


def _parallel_corpus(directory, lines: int):
  directory.mkdir()
  for name, count in (("train", lines), ("val", 8)):
    (directory / f"{name}.de").write_text("".join(f"satz nummer {i} ist hier\n"
                                                  for i in range(count)))
    (directory / f"{name}.en").write_text("".join(f"sentence number {i} is here\n"
                                                  for i in range(count)))
  return directory


def _prepared(data_dir):
  return sorted(str(p) for p in data_dir.rglob("dataset_info.json"))


def _leftovers(data_dir):
  return sorted(str(p) for p in data_dir.rglob("incomplete*"))


def test_a_full_disk_while_tfds_prepares_leaves_no_partial_data(tmp_path):
  corpus = _parallel_corpus(tmp_path / "corpus", 3000)
  data_dir = tmp_path / "tfds"
  code = f"""
  from errors import WriteError
  from input_pipeline import local_builders, sources
  builder = local_builders.parallel_text_builder(
      {str(corpus)!r}, ("de", "en"), {{"train": "train", "validation": "val"}}, {str(data_dir)!r})
  try:
    sources.prepare(builder, needs_tensorflow=False)
  except WriteError as e:
    print("error:", e)
  """
  result = _limited(code, 20_000)
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stdout.strip().splitlines()[-1]
  assert line.startswith(f"error: cannot write {data_dir}/parallel_text_files/"), line
  assert f"({TOO_LARGE}); no partial preparation is left" in line
  assert "config.data.tfds_data_dir" in line
  assert _prepared(data_dir) == [] and _leftovers(data_dir) == []

  builder = local_builders.parallel_text_builder(  # room again: it prepares in full
      str(corpus), ("de", "en"), {"train": "train", "validation": "val"}, str(data_dir))
  opened = sources.open_splits(builder, ["train"], needs_tensorflow=False)
  assert len(opened["train"]) == 3000 and len(_prepared(data_dir)) == 1


def _translation_files_flags(tmp_path, **fields):
  corpus = _parallel_corpus(tmp_path / "corpus", 64)
  values = {"data.data_dir": str(corpus), "data.tfds_data_dir": str(tmp_path / "tfds"),
            "data.file_splits": "train=train,validation=val", "model.tokenizer": "bytes",
            "train.num_train_steps": "2", **fields}
  return ["--config=configs/translation.py", f"--workdir={tmp_path / 'run'}",
          *(f"--config.{k}={v}" for k, v in values.items())]


def test_an_unwritable_tfds_data_dir_is_one_line_and_leaves_nothing(tmp_path):
  blocker = _blocker(tmp_path)
  result = run_main(*_translation_files_flags(
      tmp_path, **{"data.tfds_data_dir": str(blocker / "tfds")}))
  assert_one_error_line(result, f"cannot write {blocker}/tfds/",
                        f"(Not a directory: {blocker} is a file)",
                        "config.data.tfds_data_dir")
  assert not (tmp_path / "run").exists()
  assert blocker.read_text() == "not a directory"


def test_an_unwritable_workdir_stops_before_the_data_is_prepared(tmp_path):
  blocker = _blocker(tmp_path)
  flags = _translation_files_flags(tmp_path)
  flags[1] = f"--workdir={blocker}/run"
  assert_one_error_line(run_main(*flags), f"{blocker}/run", "Not a directory")
  assert not (tmp_path / "tfds").exists() or _prepared(tmp_path / "tfds") == []


def test_a_tokenizer_that_cannot_be_saved_is_one_error_and_no_file(tmp_path, monkeypatch):
  texts = ["der hund sieht die katze", "die katze sieht den hund"] * 20
  blocker = _blocker(tmp_path)
  path = blocker / "tokenizer.json"
  with pytest.raises(errors.WriteError, match=f"cannot write {path} .Not a directory: "):
    tokenizers.get_or_build("chars", str(path), lambda: texts, 64)
  saved = tmp_path / "tokenizer.model"
  saved.write_bytes(b"an earlier model")
  monkeypatch.setattr(files.os, "fsync", _no_space)
  with pytest.raises(errors.WriteError) as raised:
    tokenizers.train_sentencepiece(texts, 16, str(saved))
  assert str(raised.value).startswith(f"cannot write {saved} ({NO_SPACE}); the earlier file")
  assert saved.read_bytes() == b"an earlier model"
  assert sorted(os.listdir(tmp_path)) == ["a_file", "tokenizer.model"]


# ----------------------------------------------------------------------------- modes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("write_errors") / "run")
  config = tiny_config(train=dict(num_train_steps=10), eval=dict(eval_every_steps=1000))
  train.train_and_evaluate(config, workdir, final_evaluation=False)
  return config, workdir


def _no_compute(*args, **kwargs):
  raise AssertionError("the compute started before the place of its output was tried")


@pytest.fixture
def blocked(trained):
  """The trained workdir with `eval` and `attention` made files, removed afterwards."""
  config, workdir = trained
  made = [os.path.join(workdir, name) for name in ("eval", "attention")]
  for path in made:
    with open(path, "w", encoding="utf-8") as f:
      f.write("in the way")
  yield config, workdir
  for path in made:
    os.remove(path)


def test_eval_reports_place_is_tried_before_the_evaluation(blocked, monkeypatch):
  config, workdir = blocked
  monkeypatch.setattr(steps, "compile_steps", _no_compute)
  with pytest.raises(errors.WriteError) as raised:
    modes.evaluate_checkpoint(config, workdir)
  place = os.path.join(workdir, "eval")
  assert f"cannot write {place} (Not a directory: {place} is a file); nothing has been " \
         "written there yet" in str(raised.value)
  assert fault_injection.readable_steps(workdir) == [10]


def test_attention_images_place_is_tried_before_the_maps(blocked, monkeypatch):
  config, workdir = blocked
  monkeypatch.setattr(attention_maps, "example_maps", _no_compute)
  place = os.path.join(workdir, "attention")
  with pytest.raises(errors.WriteError, match=f"cannot write {place} .Not a directory: "):
    modes.attention_report(config, workdir, example=0)
  monkeypatch.setattr(steps, "compile_masked_eval", _no_compute)
  with pytest.raises(errors.WriteError, match=f"cannot write {place} .Not a directory: "):
    modes.head_importance(config, workdir)


def test_a_profile_trace_place_is_tried_before_the_steps(tmp_path):
  blocker = _blocker(tmp_path)
  with pytest.raises(errors.WriteError, match=f"Not a directory: {blocker} is a file"):
    monitors.StepTrace(str(blocker / "profile"), 0, 2)
  monitors.StepTrace(str(blocker / "profile"), 0, 0)  # no trace asked: nothing tried
