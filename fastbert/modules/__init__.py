"""Building blocks of the encoder (shared with the reference, which takes its ops as a parameter)."""

from fastbert.reference.model import (
                                      Attention,
                                      Block,
                                      Embedding,
                                      FeedForward,
                                      LayerNorm,
                                      SinusoidalPosition,
                                      Sublayer,
)

__all__ = ["Attention", "Block", "Embedding", "FeedForward", "LayerNorm", "SinusoidalPosition", "Sublayer"]
