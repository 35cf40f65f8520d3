"""TextCAM: Class Activation Maps explained in words.

The method as a library (no orchestration): CAM weights at a target layer, a channel bank that
maps every channel to a direction in CLIP space, and phrase selection over a vocabulary.
"""

__version__ = "0.1.0"
