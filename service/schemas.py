"""Wire formats of the JSON API (the OpenAPI schema is generated from these).

Tensors (`inputs`, a given `baseline`) are parsed straight into numpy by `service.inputs`, which
checks them against the model's manifest; everything else is validated by these models.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

Matrix = list[list[float]]

EXAMPLE_SEQUENCE = [[0.1, -0.3, 1.2], [0.0, 0.5, -1.1]]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"inputs": [EXAMPLE_SEQUENCE]}]})

    inputs: list[Matrix] = Field(
        ..., description="One or more sequences, each T x N raw values (time steps x features); "
        "the server applies the model's standardisation. Sequences may differ in length.",
    )


class Prediction(BaseModel):
    label: str
    class_index: int
    probabilities: dict[str, float]
    logits: list[float]


class PredictResponse(BaseModel):
    model: str
    version: int
    predictions: list[Prediction]


Method = Literal["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad", "occlusion", "tsr"]
GRADIENT_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad")


class ExplainParameters(BaseModel):
    """Method parameters; each method reads only its own and rejects the others (which ones a
    method takes comes from its registration in `attribution.METHODS`; TSR takes its own and its
    base method's)."""

    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(None, ge=1, description="integrated_gradients: integration steps (default 50)")
    baseline: Union[Literal["zeros", "mean"], Matrix, None] = Field(
        None, description="integrated_gradients, occlusion, tsr: 'mean' (training mean, default), 'zeros', "
        "or a T x N matrix of raw values")
    samples: int | None = Field(None, ge=1, description="smoothgrad: noisy samples (default 20)")
    noise: float | None = Field(None, ge=0, description="smoothgrad: noise stdev in standardised units "
                                "(default 0.15, at most the server's max_smoothgrad_noise, 10 by default)")
    seed: int | None = Field(None, ge=0, description="smoothgrad: noise seed (default 0), for repeatable answers")
    window: tuple[int, int] | None = Field(None, description="occlusion: (time steps, features) window")
    stride: tuple[int, int] | None = Field(None, description="occlusion: stride (default: the window)")
    base_method: Literal["gradient", "input_x_gradient", "integrated_gradients", "smoothgrad"] | None = Field(
        None, description="tsr: the attribution TSR refines (default gradient)")
    threshold_quantile: float | None = Field(None, ge=0, le=1, description="tsr: time steps above this "
                                             "quantile of time relevance get feature relevance (default 0.55)")
    feature_default: float | None = Field(None, ge=0, le=1, description="tsr: feature relevance of other steps")


class ExplainOptions(BaseModel):
    """What to explain and how, apart from the inputs: the same for every wire format (JSON body,
    query parameters of a binary body, V2 request parameters, KServe V1), checked by one model."""

    method: Method = "gradient"
    parameters: ExplainParameters = Field(default_factory=ExplainParameters)
    target: Union[Literal["predicted", "all"], StrictInt, StrictStr, list[Union[StrictInt, StrictStr]]] = Field(
        "predicted", description="'predicted' (default), 'all' classes, a class name or index, or a list of them")
    absolute: bool = Field(True, description="return |attribution| (saliency) rather than signed values")
    normalize: Literal["none", "minmax", "sum"] = Field(
        "none", description="scale each T x N matrix: 'minmax' to [0, 1], 'sum' to total 1 (after `absolute`)")
    attention: bool = Field(False, description="also return input-cell attention weights (T x T, averaged over "
                            "hops) for ICA models")

    model_config = ConfigDict(extra="forbid")


class ExplainRequest(ExplainOptions):
    inputs: list[Matrix] = Field(..., description="As for /predict.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [EXAMPLE_SEQUENCE], "method": "gradient", "target": "all"}]},
    )


class Attribution(BaseModel):
    target: str
    target_index: int
    saliency: Matrix = Field(..., description="T x N")
    time_profile: list[float] = Field(..., description="saliency summed over features, per time step")
    feature_profile: list[float] = Field(..., description="saliency summed over time, per feature")


class SequenceExplanation(BaseModel):
    prediction: Prediction
    attributions: list[Attribution]
    attention: Matrix | None = None


class ExplainResponse(BaseModel):
    model: str
    version: int
    method: str
    explanations: list[SequenceExplanation]


class ErrorBody(BaseModel):
    error: str
    code: str
    field: str | None = None
    request_id: str | None = None


# The error answers every inference route documents (OpenAPI), in the one format above.
ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 503, 504)}
