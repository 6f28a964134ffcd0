"""SigV4 signatures for upstream AWS requests, made by botocore's own signer from the route's credentials.

botocore is the optional ``metergate[bedrock]`` extra, imported here only, and this module is imported only
when a bedrock route is configured: a sidecar without one never loads it.

What is signed is what is sent: the exact URL (its path already encoded as AWS expects), the
``Content-Type`` and the exact body; ``Host`` is derived from the URL as the HTTP client sends it. The
client's own ``Authorization`` and every ``X-Amz-*`` header it sent are removed first, so that no client
credential, date or security token rides along with the operator's signature.
"""

from __future__ import annotations

from multidict import CIMultiDict
from yarl import URL

from metergate.config.bedrock import SIGNING_SERVICE, BedrockSettings

_SIGNED_OUT = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token")


class SigV4Signer:
    def __init__(self, settings: BedrockSettings) -> None:
        try:
            from botocore.auth import SigV4Auth
            from botocore.credentials import Credentials
        except ImportError:  # pragma: no cover - depends on the installation
            raise RuntimeError("a bedrock route needs botocore: install metergate[bedrock]") from None
        token = settings.session_token.get_secret_value() if settings.session_token is not None else None
        credentials = Credentials(settings.access_key_id.get_secret_value(),
                                  settings.secret_access_key.get_secret_value(), token)
        self._auth = SigV4Auth(credentials, SIGNING_SERVICE, settings.region)

    def sign(self, method: str, url: URL, headers: CIMultiDict[str], body: bytes) -> CIMultiDict[str]:
        """``headers`` without the client's AWS headers, plus the signature over ``method url body``."""
        from botocore.awsrequest import AWSRequest

        out: CIMultiDict[str] = CIMultiDict(
            (name, value) for name, value in headers.items()
            if name.lower() != "authorization" and not name.lower().startswith(("x-amz-", "amz-sdk-")))
        signed = {"Content-Type": out.get("Content-Type", "application/json")}
        request = AWSRequest(method=method, url=str(url), data=body, headers=signed)
        self._auth.add_auth(request)
        for name in _SIGNED_OUT:
            value = request.headers.get(name)
            if value is not None:
                out[name] = value
        out["Content-Type"] = signed["Content-Type"]
        return out
