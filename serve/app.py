"""Application builder: validated config -> bound Ray Serve deployments.

`serve run serve/config.yaml` / `serve deploy serve/config.yaml` call
`build_app(args)` with the `args:` of the config file.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from deployments.decoder import Decoder
from deployments.encoder import Encoder
from deployments.preprocess import Preprocess
from serve.config import AppConfig
from serve.ingress import Ingress


def build_app(args: dict[str, Any] | AppConfig | None = None) -> Application:
    """Ingress -> (Preprocess -> Encoder ->) Decoder; the image stages only when images are on."""
    config = args if isinstance(args, AppConfig) else AppConfig.model_validate(args or {})
    stages = config.deployments
    decoder = Decoder.options(**stages.decoder.serve_options()).bind(config)
    image_stages = {}
    if config.images.max_images_per_request > 0:
        image_stages = {
            "preprocess": Preprocess.options(**stages.preprocess.serve_options()).bind(config),
            "encoder": Encoder.options(**stages.encoder.serve_options()).bind(config),
        }
    return Ingress.options(**stages.ingress.serve_options()).bind(config, decoder, **image_stages)
