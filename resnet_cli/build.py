"""Builds a run's parts from config nodes, the one place train, lr-find, eval, predict and export get them from."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn


def build_model(model_cfg: Mapping[str, Any], num_classes: int, image_size: int | None = None,
                *, fetch_weights: bool = True) -> nn.Module:
    """Instantiate the model node with `num_classes` outputs.

    `image_size` is the resolved training size (the config may say `auto`, which only the
    data can resolve); it reaches builders that read it (stem=auto). Without `fetch_weights`
    the pretrained source is not loaded (a checkpoint's own weights follow).
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    # enum_to_str: a typed node's choices (stem, shortcut, head, ...) reach the builders as the plain words.
    cfg = (OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True) if isinstance(model_cfg, DictConfig)
           else dict(model_cfg))
    if image_size is not None and "image_size" in cfg:
        cfg["image_size"] = int(image_size)
    if not fetch_weights and cfg.get("pretrained"):
        cfg["pretrained"] = False
    return instantiate(cfg)(num_classes=num_classes)
