"""The one typed loader for params.yaml, used by every stage (docs/parameters.md explains each key).

Defaults live in params.yaml, not here: every field is required, so a missing key is as loud
as an unknown one. pydantic does the checking; `load_params` turns its report into one line
that names the key and what is allowed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from stages.lib.cli import UserError
from stages.lib.paths import PARAMS_FILE


class Strict(BaseModel):
    # Numbers finite, booleans only true or false, integers not booleans: YAML's `.inf`, `true` for
    # an epoch count or 'yes' for a flag are typos that would cost a model, not settings.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def not_a_bool(value):
    if isinstance(value, bool):
        raise ValueError("should be a number, not true or false")
    return value


def not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("should not be blank")
    return value


# A float from a number or a numeric string (YAML reads 1e-3 as a string), never from a boolean.
Number = Annotated[float, BeforeValidator(not_a_bool)]
Text = Annotated[str, AfterValidator(not_blank)]
PositiveFloat = Annotated[Number, Field(gt=0)]
WEEK_SECONDS = 7 * 24 * 3600
Fraction = Annotated[Number, Field(gt=0, lt=1)]
UnitInterval = Annotated[Number, Field(gt=0, le=1)]


class DataParams(Strict):
    url: Text
    sha256: Optional[str] = Field(pattern=r"^[0-9a-f]{64}$")
    timeout: PositiveFloat
    retries: Annotated[StrictInt, Field(ge=0, le=20)]
    retry_backoff: Annotated[Number, Field(ge=0)]
    max_unpacked_mb: PositiveFloat
    max_members: Annotated[StrictInt, Field(ge=1)]


class IndexParams(Strict):
    seed: StrictInt
    val_fraction: Fraction
    split_ratios: tuple[Fraction, Fraction, Fraction]
    max_pixels: Annotated[StrictInt, Field(ge=1)]
    workers: Annotated[StrictInt, Field(ge=0)]
    labels: Optional[Text]
    path_column: Optional[Text]
    label_column: Optional[Text]
    split_column: Optional[Text]
    group_by: Optional[Text]

    @field_validator("group_by")
    @classmethod
    def compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return pattern

    @field_validator("split_ratios")
    @classmethod
    def ratios_sum_to_one(cls, ratios: tuple[float, float, float]) -> tuple[float, float, float]:
        if not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
            raise ValueError(f"must be three fractions (train, val, test) summing to 1, got sum {sum(ratios):g}")
        return ratios


class ModelParams(Strict):
    backbone: Text
    weights: Text
    head: Literal["linear", "mlp"]
    hidden: Annotated[StrictInt, Field(ge=1)]
    dropout: Annotated[Number, Field(ge=0, lt=1)]
    tta: Literal["none", "hflip"]


class AugmentParams(Strict):
    crop_scale: tuple[UnitInterval, UnitInterval]
    hflip: Annotated[Number, Field(ge=0, le=1)]
    rotation: Annotated[Number, Field(ge=0, le=180)]
    color_jitter: Annotated[Number, Field(ge=0, le=1)]
    policy: Literal["none", "trivial", "rand"]
    erasing: Annotated[Number, Field(ge=0, le=1)]

    @field_validator("crop_scale")
    @classmethod
    def ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"must be [min, max] with min <= max, got {list(scale)}")
        return scale


class FeaturesParams(Strict):
    views: Annotated[StrictInt, Field(ge=0, le=64)]
    batch_size: Annotated[StrictInt, Field(ge=1)]
    workers: Annotated[StrictInt, Field(ge=0)]
    seed: StrictInt


class LeaksParams(Strict):
    threshold: Annotated[Number, Field(gt=0, le=1)]
    pictures: Annotated[StrictInt, Field(ge=1, le=64)]


class TrainParams(Strict):
    epochs: Annotated[StrictInt, Field(ge=0)]
    head_epochs: Annotated[StrictInt, Field(ge=0)]
    batch_size: Annotated[StrictInt, Field(ge=1)]
    head_batch_size: Annotated[StrictInt, Field(ge=1)]
    head_max_steps: Annotated[StrictInt, Field(ge=1)]
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: PositiveFloat
    backbone_lr_mult: Annotated[Number, Field(gt=0, le=1)]
    layer_decay: Annotated[Number, Field(gt=0, le=1)]
    momentum: Annotated[Number, Field(ge=0, lt=1)]
    weight_decay: Annotated[Number, Field(ge=0)]
    scheduler: Literal["step", "cosine", "onecycle", "none"]
    step_size: Annotated[StrictInt, Field(ge=1)]
    gamma: Annotated[Number, Field(gt=0, le=1)]
    label_smoothing: Annotated[Number, Field(ge=0, lt=1)]
    class_weighting: Literal["none", "balanced", "sampler"]
    select_on: Literal["accuracy", "macro_f1"]
    freeze_bn: StrictBool
    trainable_fraction: Annotated[Number, Field(gt=0, le=1)]
    image_size: Annotated[StrictInt, Field(ge=32)] | None
    eval_size: Annotated[StrictInt, Field(ge=32)] | None
    patience: Annotated[StrictInt, Field(ge=0)]
    # A week at most: a budget is a wall-clock plan, and a typo such as 1e9 (31 years) is one
    time_budget: Annotated[Number, Field(gt=0, le=WEEK_SECONDS)] | None
    head_search: StrictBool
    seed: StrictInt
    workers: Annotated[StrictInt, Field(ge=0)]
    amp: StrictBool | Literal["auto"]
    channels_last: StrictBool
    compile: StrictBool


class EvaluateParams(Strict):
    batch_size: Annotated[StrictInt, Field(ge=1)]
    workers: Annotated[StrictInt, Field(ge=0)]
    grid_images: Annotated[StrictInt, Field(ge=1, le=64)]


class SuspectsParams(Strict):
    """The out-of-fold heads' own settings: an audit of the data, so no train or model param
    reruns it."""
    folds: Annotated[StrictInt, Field(ge=2)]
    epochs: Annotated[StrictInt, Field(ge=1)]
    max_steps: Annotated[StrictInt, Field(ge=1)]
    batch_size: Annotated[StrictInt, Field(ge=1)]
    lr: PositiveFloat
    weight_decay: Annotated[Number, Field(ge=0)]
    dropout: Annotated[Number, Field(ge=0, lt=1)]
    label_smoothing: Annotated[Number, Field(ge=0, lt=1)]
    seed: StrictInt


class ExportParams(Strict):
    int8: StrictBool
    calibration_images: Annotated[StrictInt, Field(ge=1)]
    int8_tolerance: Annotated[Number, Field(ge=0, le=1)]


class LatencyParams(Strict):
    runs: Annotated[StrictInt, Field(ge=1)]


class Params(Strict):
    strategy: Literal["auto", "frozen", "finetune", "scratch"]
    data: DataParams
    index: IndexParams
    model: ModelParams
    augment: AugmentParams
    features: FeaturesParams
    leaks: LeaksParams
    suspects: SuspectsParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    latency: LatencyParams

    @model_validator(mode="after")
    def strategy_has_epochs(self) -> "Params":
        needs = {"auto": ("head_epochs", "epochs"), "frozen": ("head_epochs",), "finetune": ("epochs",),
                 "scratch": ("epochs",)}
        for key in needs[self.strategy]:
            if getattr(self.train, key) < 1:
                raise ValueError(f"strategy {self.strategy} needs train.{key} >= 1")
        return self


def format_validation_error(error: ValidationError, source: Path) -> str:
    """The first problem as one line: `params.yaml: index.seed: Input should be ... (got 'x')`."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'; remove it or fix its spelling (see docs/parameters.md)"
    if first["type"] == "missing":
        return f"{source}: missing key '{key}'; add it (see docs/parameters.md)"
    return f"{source}: {key}: {first['msg']} (got {first.get('input')!r})"


def load_params(path: Path = PARAMS_FILE) -> Params:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the project root, where params.yaml lives") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        return Params.model_validate(raw if raw is not None else {})
    except ValidationError as err:
        raise UserError(format_validation_error(err, path)) from None
