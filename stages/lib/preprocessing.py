"""What an image must look like on the way into a backbone: recorded with the pretrained weights,
the cached features, every checkpoint and the export sidecar, so each place that scores an image
prepares it the same way."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class Preprocessing:
    """The backbone's own configuration."""

    input_size: int
    resize_size: int  # evaluation: resize the short side to this, then center-crop input_size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def at_size(self, size: int | None) -> "Preprocessing":
        """The same at another crop size (None: this one), the resize scaled with it."""
        if size is None or size == self.input_size:
            return self
        return replace(self, input_size=size, resize_size=round(size * self.resize_size / self.input_size))

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(**{**data, "mean": tuple(data["mean"]), "std": tuple(data["std"])})
