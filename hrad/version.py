"""Package version and the model-artifact format version.

``ARTIFACT_FORMAT`` changes whenever a saved model could be misread by new code; loading an
artifact with another format is refused with a clear message.
"""

__version__ = "0.1.0"
ARTIFACT_FORMAT = 2  # 2: seam-free tiling (context margins, shifted last tiles)
