"""Where the client finds its server and admin key: arguments, the environment, or a profile file.

``~/.config/metergate/profiles.toml`` (``$XDG_CONFIG_HOME`` honoured; another file with
``METERGATE_PROFILES_FILE``) holds named profiles::

    [default]
    url = "http://127.0.0.1:8080"
    admin_key = "mg_test_..."
    mode = "test"            # optional: refuse a key of the other mode

The profile is ``--profile`` / ``METERGATE_PROFILE`` (default ``default``). ``METERGATE_URL`` and
``METERGATE_ADMIN_KEY`` override the profile's values.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from metergate_client.errors import MetergateError

DEFAULT_URL = "http://127.0.0.1:8080"


class ProfileError(MetergateError):
    """The profile file or the settings it gives are unusable (the message names what is wrong)."""


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    url: str
    admin_key: str
    mode: str | None = None


def profiles_file() -> Path:
    explicit = os.environ.get("METERGATE_PROFILES_FILE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "metergate" / "profiles.toml"


def load_profile(name: str | None = None, *, url: str | None = None, admin_key: str | None = None) -> Profile:
    name = name or os.environ.get("METERGATE_PROFILE") or "default"
    path = profiles_file()
    section: dict[str, object] = {}
    if path.is_file():
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ProfileError(f"profile file {path} is not valid TOML: {' '.join(str(exc).split())}") from None
        found = document.get(name)
        if found is not None and not isinstance(found, dict):
            raise ProfileError(f"profile {name!r} in {path} must be a table")
        section = found or {}
        unknown = sorted(set(section) - {"url", "admin_key", "mode"})
        if unknown:
            raise ProfileError(f"profile {name!r} in {path}: unknown key {unknown[0]!r} (url, admin_key, mode)")
    elif name != "default":
        raise ProfileError(f"profile {name!r} asked for, but there is no profile file at {path}")
    chosen_url = url or os.environ.get("METERGATE_URL") or section.get("url") or DEFAULT_URL
    key = admin_key or os.environ.get("METERGATE_ADMIN_KEY") or section.get("admin_key")
    mode = section.get("mode")
    if not isinstance(chosen_url, str) or not chosen_url.startswith(("http://", "https://")):
        raise ProfileError(f"the server URL must start with http:// or https://, not {chosen_url!r}")
    if not isinstance(key, str) or not key:
        raise ProfileError(f"no admin key: set METERGATE_ADMIN_KEY or admin_key in profile {name!r} of {path}")
    if not key.startswith(("mg_test_", "mg_live_")):
        raise ProfileError("the admin key must start with mg_test_ or mg_live_")
    if mode is not None and mode not in ("test", "live"):
        raise ProfileError(f"profile {name!r}: mode must be 'test' or 'live', not {mode!r}")
    if mode is not None and not key.startswith(f"mg_{mode}_"):
        raise ProfileError(f"profile {name!r} is for {mode} mode but the admin key is a {key[3:7]} key")
    return Profile(name, chosen_url, key, mode if isinstance(mode, str) else None)
