"""Settings and the route table."""

from metergate.config.routes import RouteMatch, RouteSettings, RouteTable
from metergate.config.settings import Settings, SettingsError, load_settings

__all__ = ["RouteMatch", "RouteSettings", "RouteTable", "Settings", "SettingsError", "load_settings"]
