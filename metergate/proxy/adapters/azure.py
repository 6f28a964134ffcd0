"""Azure OpenAI: the OpenAI wire format under deployment paths, priced by the route's deployment map.

Which paths are metered, and the ``api-version`` rule, are in :mod:`metergate.config.azure`. A request is
priced, counted and estimated as the model its deployment maps to in the route's ``deployments``, never as
the body's ``model`` (which Azure ignores on deployment paths): a body that names another model is billed
as the deployment's, and the usage record names the deployment. A deployment the map does not list is
refused with 404 ``unknown_deployment`` before the body is read, so nothing is held or forwarded. Bodies,
usage and streams are OpenAI's, metered by :class:`~metergate.proxy.adapters.openai.OpenAIAdapter`; the
operator's key goes up as Azure's ``api-key`` header.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from metergate.config import azure
from metergate.config.media import MediaSettings
from metergate.errors import NotFound
from metergate.metering.usage import Usage
from metergate.proxy.adapters import openai, responses
from metergate.proxy.adapters.base import Prepared, StreamMeter
from metergate.proxy.adapters.schema import check_model


class AzureEndpoint(str):
    """An endpoint name (``chat.completions``, ...) that also carries the Azure target it was classified
    from: the pipeline hands what :meth:`AzureAdapter.classify` returns to :meth:`AzureAdapter.prepare`
    unchanged, and this is how the deployment in the path gets there."""

    target: azure.Target

    def __new__(cls, target: azure.Target) -> AzureEndpoint:
        endpoint = super().__new__(cls, target.endpoint)
        endpoint.target = target
        return endpoint


class AzureAdapter:
    name = "azure"

    def __init__(self, deployments: dict[str, str], *, charge_failed: bool = False,
                 media: MediaSettings | None = None) -> None:
        self._deployments = dict(deployments)
        self._media = media or MediaSettings()
        self._openai = openai.OpenAIAdapter(charge_failed=charge_failed, media=self._media)

    def classify(self, path: str) -> str | None:
        found = azure.target(tuple(path[1:].split("/")))  # no segment contains "/" (metergate.urls)
        if found is None:
            return None
        if found.deployment is not None:
            self.model_of(found.deployment)  # refused before the body is read
        return AzureEndpoint(found)

    def model_of(self, deployment: str) -> str:
        """The model ``deployment`` is priced as; 404 ``unknown_deployment`` when the route does not serve it."""
        model = self._deployments.get(deployment)
        if model is None:
            shown = repr(deployment) if azure.DEPLOYMENT_NAME.fullmatch(deployment) else "named"
            raise NotFound(f"The deployment {shown} is not served by this route; nothing was charged.",
                           code="unknown_deployment", param="model")
        return model

    def prepare(self, endpoint: str, body: bytes, payload: dict[str, Any], default_max_output: int) -> Prepared:
        # Without a target (a price quote naming the endpoint alone) the body's model names the deployment,
        # as on the v1 API: it is priced only if the map lists it.
        target = endpoint.target if isinstance(endpoint, AzureEndpoint) else None
        deployment = target.deployment if target is not None and target.deployment else check_model(payload)
        model = self.model_of(deployment)
        if endpoint == responses.RESPONSES:
            prepared = responses.prepare(body, payload, default_max_output, self._media, model=model)
        else:
            prepared = openai.prepare(str(endpoint), body, payload, default_max_output, self._media, model=model)
        return replace(prepared, deployment=deployment)

    def usage_from_body(self, prepared: Prepared, body: bytes) -> tuple[Usage | None, str]:
        return self._openai.usage_from_body(prepared, body)

    def stream_meter(self, prepared: Prepared, max_text_chars: int) -> StreamMeter:
        return self._openai.stream_meter(prepared, max_text_chars)

    def auth_header(self, key: str) -> tuple[str, str]:
        return "api-key", key
