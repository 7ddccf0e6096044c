"""From-scratch Transformer modules (Flax linen). Nothing here knows about data or flags."""

from models.transformer import (Classifier, DecoderOnly, EncoderDecoder,
                                TransformerConfig, shift_right)

__all__ = ["Classifier", "DecoderOnly", "EncoderDecoder", "TransformerConfig", "shift_right"]
