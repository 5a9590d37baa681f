"""Telemetry export: request events and runtime samples to the control plane, through a disk spool."""

from inference.telemetry.exporter import TelemetryExporter
from inference.telemetry.spool import Cursor, Spool, SpoolRecord

__all__ = ["Cursor", "Spool", "SpoolRecord", "TelemetryExporter"]
