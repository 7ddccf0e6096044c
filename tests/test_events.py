"""training/events.py's hand-written TensorBoard records, read back with tensorboardX's
generated protocol buffers (an independent decoder) and compared with its encoder."""

import io
import os
import struct

import numpy as np
from PIL import Image
from tensorboardX import summary as tb_summary
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c as tb_masked_crc32c

from tests.test_write_errors import _tfrecords
from training import events, reporting


def test_crc32c_matches_the_standard_check_value_and_tensorboardx():
  assert events.crc32c(b"123456789") == 0xE3069283  # CRC-32C's published check value
  assert events.crc32c(b"") == 0
  rng = np.random.default_rng(0)
  for size in (0, 1, 7, 8, 100, 4099):
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    assert events.masked_crc32c(data) == tb_masked_crc32c(data), size


def test_scalar_and_text_summaries_equal_tensorboardx_ones():
  for tag, value in (("train/loss", 0.6931), ("eval/accuracy", 1.0), ("x", -3e38),
                     ("ünïcode tag", float("nan"))):
    ours = summary_pb2.Summary.FromString(events.scalar(tag, value))
    theirs = tb_summary.scalar(tag, value) if tag.isascii() else None
    assert ours.value[0].tag == tag
    np.testing.assert_equal(ours.value[0].simple_value, np.float32(value))
    if theirs is not None:
      assert ours.SerializeToString() == theirs.SerializeToString()
  content = "    a table\n    | x | y |\n\nünïcode ✓"
  ours = summary_pb2.Summary.FromString(events.text("eval/examples", content))
  theirs = tb_summary.text("eval/examples", content)
  assert ours == theirs
  assert ours.value[0].tensor.string_val[0].decode("utf-8") == content


def test_an_image_summary_holds_the_pixels_as_a_png():
  rng = np.random.default_rng(1)
  for channels in (1, 3, 4):
    pixels = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
    value = summary_pb2.Summary.FromString(events.image("eval/confusion", pixels)).value[0]
    assert value.tag == "eval/confusion"
    assert (value.image.height, value.image.width, value.image.colorspace) == (5, 7, channels)
    decoded = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)))
    np.testing.assert_array_equal(decoded.reshape(pixels.shape), pixels)
    reference = tb_summary.image("eval/confusion", pixels, dataformats="HWC").value[0]
    assert (reference.image.height, reference.image.width) == (5, 7)
  for bad in (np.zeros((5, 7, 3), np.float32), np.zeros((5, 7), np.uint8),
              np.zeros((5, 7, 2), np.uint8)):
    try:
      events.image("x", bad)
    except ValueError as e:
      assert "uint8" in str(e)
    else:
      raise AssertionError(f"accepted {bad.dtype} {bad.shape}")


def test_events_and_records_parse_with_tensorboardx():
  summary = events.scalar("train/loss", 2.5)
  for step in (0, 1, 127, 128, 300_000, 2**40):
    parsed = event_pb2.Event.FromString(events.event(1234.5, step, summary))
    assert (parsed.wall_time, parsed.step) == (1234.5, step)
    assert parsed.summary.value[0].simple_value == 2.5
  version = event_pb2.Event.FromString(events.event(1.0, file_version="brain.Event:2"))
  assert version.file_version == "brain.Event:2" and not version.HasField("summary")
  data = events.event(7.0, 3, summary)
  framed = events.record(data)
  assert len(framed) == len(data) + 16
  assert struct.unpack("<Q", framed[:8])[0] == len(data)
  assert struct.unpack("<I", framed[8:12])[0] == tb_masked_crc32c(framed[:8])
  assert framed[12:-4] == data
  assert struct.unpack("<I", framed[-4:])[0] == tb_masked_crc32c(data)


def test_a_metric_writer_file_reads_back_in_order(tmp_path):
  writer = reporting.MetricWriter(str(tmp_path))
  writer.write_scalars(10, {"train/loss": 1.5, "train/accuracy": 0.25})
  writer.write_text(10, "eval/examples", "hello")
  writer.write_image(20, "eval/image", np.full((2, 3, 3), 200, np.uint8))
  writer.close()
  (name,) = os.listdir(tmp_path / "tensorboard")
  read = _tfrecords(str(tmp_path / "tensorboard" / name))  # every length and CRC checked
  assert read[0].file_version == "brain.Event:2"
  assert [(e.step, v.tag) for e in read[1:] for v in e.summary.value] == [
      (10, "train/loss"), (10, "train/accuracy"), (10, "eval/examples/text_summary"),
      (20, "eval/image")]
  assert read[2].summary.value[0].simple_value == 0.25
