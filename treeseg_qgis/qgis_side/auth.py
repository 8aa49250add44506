"""The Hugging Face token in the QGIS authentication database.

The token lives in an encrypted "Basic" authentication configuration (the token
as its password, a method every QGIS 3 and 4 has); QgsSettings keep only that
configuration's id. The token is never written to plain settings, never logged,
and reaches the engine only inside a job on the worker's stdin.
"""

from __future__ import annotations

import os
from typing import Any

from qgis.core import QgsApplication, QgsAuthMethodConfig, QgsSettings

TOKEN_CONFIG_SETTING = "treeseg/hf_token_authcfg"  # nosec B105 - the settings key of the id, not a secret
TOKEN_CONFIG_NAME = "TreeSeg: Hugging Face token"  # nosec B105 - the entry's title, not a secret
AUTH_METHOD = "Basic"
HUB_URI = "https://huggingface.co"


class TokenStoreError(RuntimeError):
    """The token could not be stored; the message says why."""


def store_token(token: str) -> None:
    """Save `token` in the authentication database, replacing a saved one; TokenStoreError when it cannot."""
    token = token.strip()
    if not token:
        raise TokenStoreError("The token is empty.")
    manager = QgsApplication.authManager()
    if manager.isDisabled():
        raise TokenStoreError(f"The QGIS authentication system is disabled: {manager.disabledMessage()}")
    config = QgsAuthMethodConfig(AUTH_METHOD)
    config.setName(TOKEN_CONFIG_NAME)
    config.setUri(HUB_URI)
    config.setConfig("username", "huggingface")
    config.setConfig("password", token)
    saved_id = _saved_config_id()
    if saved_id:
        config.setId(saved_id)
        stored, config = _outcome(manager.updateAuthenticationConfig(config), config)
    else:
        stored, config = _outcome(manager.storeAuthenticationConfig(config), config)
    if not stored or not config.id():
        raise TokenStoreError("QGIS did not store the token: the master password of the authentication "
                              "database was not entered.")
    QgsSettings().setValue(TOKEN_CONFIG_SETTING, config.id())


def stored_token() -> str | None:
    """The saved token, or None when none is saved (or the database stays locked)."""
    config_id = _saved_config_id()
    if not config_id:
        return None
    config = QgsAuthMethodConfig()
    loaded, config = _outcome(QgsApplication.authManager().loadAuthenticationConfig(config_id, config, True), config)
    return (config.config("password") or None) if loaded else None


def hf_token() -> str | None:
    """The token for a job: the one saved under TreeSeg ▸ Models…, else $HF_TOKEN, else None."""
    return stored_token() or os.environ.get("HF_TOKEN") or None


def has_stored_token() -> bool:
    """Whether a token is saved, without opening the encrypted database."""
    return bool(_saved_config_id())


def remove_token() -> None:
    """Delete the saved token from the authentication database and its id from the settings."""
    config_id = _saved_config_id()
    if config_id:
        QgsApplication.authManager().removeAuthenticationConfig(config_id)
    QgsSettings().remove(TOKEN_CONFIG_SETTING)


def _saved_config_id() -> str:
    """The id in the settings when that configuration still exists, else ''."""
    config_id = QgsSettings().value(TOKEN_CONFIG_SETTING, "", type=str)
    return config_id if config_id and config_id in QgsApplication.authManager().configIds() else ""


def _outcome(result: Any, config: QgsAuthMethodConfig) -> tuple[bool, QgsAuthMethodConfig]:
    """(success, config) from an auth manager call: QGIS 3.22 returns a bool, newer ones (bool, config)."""
    if isinstance(result, tuple):
        return bool(result[0]), result[1]
    return bool(result), config
