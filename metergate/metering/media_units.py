"""The units media endpoints are priced in besides tokens, and their quantity names.

A price rule names quantities (:mod:`metergate.pricing.rules`); the media endpoints add three kinds:

* ``audio_seconds``: whole seconds of audio, rounded up (a transcription's upload, as OpenAI bills whisper-1);
* ``characters``: characters of a speech request's ``input`` (tts-1, tts-1-hd);
* ``images_<size>_<quality>``: images generated or edited at one size and quality
  (``images_1024x1024_standard``, ``images_1024x1792_hd``), the DALL-E price table's cells.

An image's price key in the settings is ``<size>`` or ``<size>/<quality>`` (``1024x1024/hd``); a size alone
means ``standard``. Sizes are ``WIDTHxHEIGHT`` with sides of 256 to 4096 pixels.
"""

from __future__ import annotations

import re

AUDIO_SECONDS = "audio_seconds"
CHARACTERS = "characters"
IMAGE_QUALITIES = ("standard", "hd", "low", "medium", "high", "auto")
_IMAGE_KEY = re.compile(r"^([0-9]{3,4})x([0-9]{3,4})(?:/(" + "|".join(IMAGE_QUALITIES) + r"))?$")


def image_quantity(size: str, quality: str = "standard") -> str:
    """The quantity of images of ``size`` (``1024x1024``) at ``quality``."""
    return f"images_{size}_{quality}"


def image_key_quantity(key: str) -> str:
    """The quantity a settings key (``1024x1024`` or ``1024x1024/hd``) prices; ``ValueError`` if malformed."""
    found = _IMAGE_KEY.match(key)
    if found is None or not all(256 <= int(side) <= 4096 for side in found.group(1, 2)):
        raise ValueError(f"image price key {key!r} must be WIDTHxHEIGHT (256-4096 px) with an optional "
                         f"/quality ({', '.join(IMAGE_QUALITIES)})")
    return image_quantity(f"{found.group(1)}x{found.group(2)}", found.group(3) or "standard")


def is_media_unit(quantity: str) -> bool:
    return quantity in (AUDIO_SECONDS, CHARACTERS) or quantity.startswith("images_")
