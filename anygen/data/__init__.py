"""Data: real images and video bundled in PyPI packages, and (later) the procedural generators."""
