"""Application builder: validated config -> bound Ray Serve deployments.

`serve run serve/config.yaml` / `serve deploy serve/config.yaml` call
`build_app(args)` with the `args:` of the config file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.decoder import Decoder
from serve.config import AppConfig
from serve.ingress import Ingress


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    stages = config.deployments
    decoder = Decoder.options(**stages.decoder.serve_options()).bind(config)
    return Ingress.options(**stages.ingress.serve_options()).bind(config, decoder)
