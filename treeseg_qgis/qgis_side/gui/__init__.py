"""The plugin's panel and background tasks (QGIS side: never imports torch or the engine's core)."""
