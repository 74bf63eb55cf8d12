"""Training data: the JSONL sample format (`samples.py`) and the pipelines that produce it."""

from .samples import SampleFormatError, TrainSample, read_samples, write_samples

__all__ = ["SampleFormatError", "TrainSample", "read_samples", "write_samples"]
