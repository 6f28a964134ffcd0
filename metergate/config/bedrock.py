"""AWS Bedrock's Converse API as a route serves it: the metered paths, the model ids, the signing credentials.

bedrock-runtime serves ``POST /model/{modelId}/converse`` and ``POST /model/{modelId}/converse-stream``,
relative to ``https://bedrock-runtime.<region>.amazonaws.com`` (the route's upstream). The AWS SDKs put
the model id in one percent-encoded path segment: ``anthropic.claude-3-haiku-20240307-v1%3A0``, an
inference profile id (``us.anthropic...``), or an ARN, whose ``/`` arrives as ``%2F``. That is the one
encoded separator metergate accepts anywhere, and only there: :func:`raw_target` decodes that segment
alone, and the decoded id must be a model id or an ARN of Bedrock's own shape (:data:`MODEL_ID`, no dot
segments), or the path is refused like any other with an encoded separator.

A model id is billed as the model the route's ``bedrock.models`` names for it (the map is also the list of
ids the route serves; an id it does not list is refused with 404 ``unknown_model`` before the body is
read). Upstream requests are signed with SigV4 from the route's credentials, which come from the settings
file (best as ``${NAME}`` references) or, when the file names none, from the standard ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` variables; never from the client.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from metergate.urls import invalid_path

CONVERSE, CONVERSE_STREAM = "converse", "converse-stream"
OPERATIONS = (CONVERSE, CONVERSE_STREAM)
SIGNING_SERVICE = "bedrock"  # bedrock-runtime signs as "bedrock"
_ID_PART = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}"
# A base model or inference profile id (anthropic.claude-3-haiku-20240307-v1:0, us.meta.llama3-...), or an
# ARN: arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic..., foundation-model/...,
# application-inference-profile/abc123, custom-model/name.x/abc123 (two parts).
MODEL_ID = re.compile(rf"{_ID_PART}|arn:aws(-[a-z]+){{0,2}}:bedrock:[a-z0-9-]{{1,20}}:([0-9]{{12}})?:"
                      rf"[a-z-]{{1,40}}(/{_ID_PART}){{1,2}}")
_RAW_ID = re.compile(r"[A-Za-z0-9._~:%-]{1,1024}")  # what the SDKs send: unreserved, ":" and escapes
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")  # a priced model name, as the schema checks models
_ENVIRONMENT = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY",
                "session_token": "AWS_SESSION_TOKEN"}


class BedrockSettings(BaseModel):
    """A ``provider: bedrock`` route's region, signing credentials and model map."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    region: str = Field(description="The AWS region the route's upstream is in (signed into every request).")
    access_key_id: SecretStr = Field(description="AWS access key id; default: $AWS_ACCESS_KEY_ID.")
    secret_access_key: SecretStr = Field(description="AWS secret access key; default: $AWS_SECRET_ACCESS_KEY.")
    session_token: SecretStr | None = Field(None, description="Session token of temporary credentials; "
                                                              "default: $AWS_SESSION_TOKEN if set.")
    models: dict[str, str] = Field(
        description="The model ids (or inference profile ids or ARNs) the route serves, each mapped to the model "
                    "it is priced as, e.g. {'us.anthropic.claude-3-haiku-20240307-v1:0': "
                    "anthropic.claude-3-haiku-20240307-v1:0}.")

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        """Credentials the settings do not name come from the standard AWS variables, read once at start-up."""
        if not isinstance(data, dict):
            return data
        filled = dict(data)
        for key, variable in _ENVIRONMENT.items():
            if filled.get(key) is None and os.environ.get(variable):
                filled[key] = os.environ[variable]
        return filled

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.fullmatch(value):
            raise ValueError("region must look like us-east-1")
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("a bedrock route serves at least one model id")
        for model_id, model in value.items():
            if not valid_model_id(model_id):
                raise ValueError(f"{model_id!r} is not a Bedrock model id, inference profile id or ARN")
            if not _MODEL.fullmatch(model) or len(model) > 128:
                raise ValueError(f"model id {model_id!r}: {model!r} is not a model name")
        return value


def valid_model_id(model_id: str) -> bool:
    if not MODEL_ID.fullmatch(model_id):
        return False
    # No part of an ARN's resource may be a dot segment, even encoded: a server that decodes %2F would
    # otherwise walk out of /model/.
    return not any(part in (".", "..") for part in model_id.split("/"))


@dataclass(frozen=True, slots=True)
class Target:
    """A metered Bedrock request target: the operation and the decoded model id."""

    operation: str  # converse or converse-stream
    model_id: str


def target(path: str) -> Target | None:
    """The target of a decoded path after the route's prefix (``/model/{id}/converse``), ``None`` for any
    other path. The id may hold the ``/`` of an ARN, so it is everything between ``/model/`` and the
    operation, and must be a valid model id."""
    if not path.startswith("/model/"):
        return None
    model_id, _, operation = path[len("/model/"):].rpartition("/")
    if operation not in OPERATIONS or not valid_model_id(model_id):
        return None
    return Target(operation, model_id)


def raw_target(raw_tail: str) -> tuple[str, ...] | None:
    """The decoded segments of a raw path tail ``/model/{raw id}/{operation}`` whose id is an ARN sent with
    ``%2F`` (which :func:`metergate.urls.path_segments` refuses everywhere else), or ``None`` when the tail
    is not of that form. The id is decoded on its own and must be a valid model id: 400 ``invalid_path``
    otherwise. The other segments are fixed words."""
    parts = raw_tail.split("/")
    if len(parts) != 4 or parts[0] != "" or parts[1] != "model" or parts[3] not in OPERATIONS:
        return None
    raw_id = parts[2]
    if not _RAW_ID.fullmatch(raw_id) or _ESCAPE.search(raw_id):
        raise invalid_path("a model id that is not a percent-encoded Bedrock model id")
    try:
        decoded = unquote_to_bytes(raw_id).decode("ascii")
    except UnicodeDecodeError:
        raise invalid_path("a model id that is not a percent-encoded Bedrock model id") from None
    if "/" not in decoded or not valid_model_id(decoded):
        raise invalid_path("an encoded separator outside a Bedrock model ARN")
    return ("model", decoded, parts[3])
