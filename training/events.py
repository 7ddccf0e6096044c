"""TensorBoard event records, encoded here: the Event and Summary protocol buffers of
TensorFlow's event files (scalars, text, PNG images) and their TFRecord framing.

Written out by hand because the messages are small and fixed, and because importing a
summary library (tensorboardX) also imports PyTorch wherever PyTorch is installed: about
2.5 s of every start-up of main.py. tests/test_reporting.py reads the bytes back with
tensorboardX's generated protocol buffers and checks them against its own encoder.

Protocol buffers' wire format: each field is a key, `field_number << 3 | wire_type`, as a
varint, then its value: a varint (type 0), 8 little-endian bytes (type 1), a
length-prefixed string, bytes or nested message (type 2), or 4 little-endian bytes
(type 5). The field numbers are those of tensorflow/core/util/event.proto and
tensorflow/core/framework/summary.proto, tensor.proto and tensor_shape.proto.
"""

import io
import struct
from typing import Optional

import numpy as np

# Event
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION, _EVENT_SUMMARY = 1, 2, 3, 5
# Summary: repeated Value value = 1
_SUMMARY_VALUE = 1
# Summary.Value
_VALUE_TAG, _VALUE_SIMPLE, _VALUE_IMAGE, _VALUE_TENSOR, _VALUE_METADATA = 1, 2, 4, 8, 9
# Summary.Image
_IMAGE_HEIGHT, _IMAGE_WIDTH, _IMAGE_COLORSPACE, _IMAGE_ENCODED = 1, 2, 3, 4
# SummaryMetadata (plugin_data = 1) and its PluginData (plugin_name = 1, content = 2)
_METADATA_PLUGIN, _PLUGIN_NAME, _PLUGIN_CONTENT = 1, 1, 2
# TensorProto, TensorShapeProto (dim = 2) and its Dim (size = 1); DT_STRING is 7
_TENSOR_DTYPE, _TENSOR_SHAPE, _TENSOR_STRING_VAL, _DT_STRING = 1, 2, 8, 7
_SHAPE_DIM, _DIM_SIZE = 2, 1


def _varint(value: int) -> bytes:
  """Little-endian base-128 digits, the high bit set on all but the last; a negative
  int64 is its two's complement in 64 bits (ten bytes)."""
  value &= (1 << 64) - 1
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _int(field: int, value: int) -> bytes:
  return _key(field, 0) + _varint(value)


def _double(field: int, value: float) -> bytes:
  return _key(field, 1) + struct.pack("<d", value)


def _float(field: int, value: float) -> bytes:
  return _key(field, 5) + struct.pack("<f", value)


def _bytes(field: int, value: bytes) -> bytes:
  """A string, bytes or an encoded message: length-delimited."""
  return _key(field, 2) + _varint(len(value)) + value


def _value(tag: str, *fields: bytes) -> bytes:
  """A Summary holding one Value: the tag, then `fields` (already encoded)."""
  value = _bytes(_VALUE_TAG, tag.encode("utf-8")) + b"".join(fields)
  return _bytes(_SUMMARY_VALUE, value)


def scalar(tag: str, value: float) -> bytes:
  """An encoded Summary: one float (TensorBoard's Scalars tab)."""
  return _value(tag, _float(_VALUE_SIMPLE, float(value)))


def text(tag: str, content: str) -> bytes:
  """An encoded Summary for the Text tab: a string tensor of shape [1] under the text
  plugin's metadata (its content, the plugin's TextPluginData, empty at version 0). The
  tag gets the suffix the text plugin's summaries have always had."""
  plugin = _bytes(_PLUGIN_NAME, b"text") + _bytes(_PLUGIN_CONTENT, b"")
  metadata = _bytes(_METADATA_PLUGIN, plugin)
  shape = _bytes(_SHAPE_DIM, _int(_DIM_SIZE, 1))
  tensor = (_int(_TENSOR_DTYPE, _DT_STRING) + _bytes(_TENSOR_SHAPE, shape)
            + _bytes(_TENSOR_STRING_VAL, content.encode("utf-8")))
  return _value(f"{tag}/text_summary", _bytes(_VALUE_TENSOR, tensor),
                _bytes(_VALUE_METADATA, metadata))


def image(tag: str, pixels) -> bytes:
  """An encoded Summary for the Images tab: `pixels` `[height, width, channels]` uint8
  (channels 1, 3 or 4), stored as a PNG."""
  from PIL import Image  # pylint: disable=import-outside-toplevel  (only runs that draw)
  pixels = np.asarray(pixels)
  if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected [height, width, 1, 3 or 4] uint8 pixels, got "
                     f"{pixels.dtype} {pixels.shape}")
  height, width, channels = pixels.shape
  png = io.BytesIO()
  Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(png, format="PNG")
  encoded = (_int(_IMAGE_HEIGHT, height) + _int(_IMAGE_WIDTH, width)
             + _int(_IMAGE_COLORSPACE, channels) + _bytes(_IMAGE_ENCODED, png.getvalue()))
  return _value(tag, _bytes(_VALUE_IMAGE, encoded))


def event(wall_time: float, step: Optional[int] = None, summary: Optional[bytes] = None,
          file_version: Optional[str] = None) -> bytes:
  """An encoded Event: its time, and a step with a summary or the file's version line."""
  out = _double(_EVENT_WALL_TIME, wall_time)
  if step is not None:
    out += _int(_EVENT_STEP, int(step))
  if file_version is not None:
    out += _bytes(_EVENT_FILE_VERSION, file_version.encode("utf-8"))
  if summary is not None:
    out += _bytes(_EVENT_SUMMARY, summary)
  return out


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord files."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotated right by 15 bits, plus a constant (so that a CRC of
  data holding CRCs does not degenerate)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord: the length (8 bytes), its masked CRC, the data, the data's masked CRC."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))
