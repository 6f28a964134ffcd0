"""Settings of metered Realtime API sessions (``GET /v1/realtime`` upgraded to a WebSocket).

A session is billed response by response: each response is held before it may start and settled from the
usage its ``response.done`` reports (:mod:`metergate.proxy.realtime`). These settings size that hold and
bound what a session may send and keep.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RealtimeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    response_hold_input_tokens: int = Field(
        4000, ge=0, le=10_000_000,
        description="Input tokens a response is held for before it may start, priced as uncached audio (the "
                    "dearest input). A later response is held for at least what the previous one cost.")
    response_hold_output_tokens: int = Field(
        2000, ge=0, le=10_000_000,
        description="Output tokens a response is held for, priced as audio output (the dearest output).")
    max_frame_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024,
        description="Largest WebSocket message accepted from the client or the upstream; a larger one closes the "
                    "session with code 1009. OpenAI accepts input audio chunks of up to 15 MiB of base64.")
    done_grace_s: float = Field(
        5, ge=0, le=120,
        description="After the client leaves mid-response, how long metergate waits for the upstream's "
                    "response.done (it sends response.cancel first) before billing an estimate instead.")
    audio_output_tokens_per_s: int = Field(
        20, ge=1, le=10_000,
        description="Output tokens per second of delivered audio, for estimates only (OpenAI bills audio output at "
                    "one token per 50 ms); audio input uses media.audio_tokens_per_s.")
    max_session_s: float = Field(
        3600, gt=0, le=86400, description="Longest session; OpenAI ends its own sessions after 60 minutes.")


__all__ = ["RealtimeSettings"]
