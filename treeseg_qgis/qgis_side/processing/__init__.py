"""The Processing provider `treeseg` and its algorithms (QGIS side only: no torch is imported here)."""
