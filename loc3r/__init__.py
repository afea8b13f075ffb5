"""loc3r: edge inference runtime for Loc3R-VLM."""

__version__ = "0.1.0"
