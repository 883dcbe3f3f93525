from .network import Decoder, DecoderConfig

__all__ = ["Decoder", "DecoderConfig"]
