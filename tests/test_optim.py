"""Optimizer and scheduler state from the configs round-trips through a weights_only checkpoint load."""

from __future__ import annotations

import io

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import Container, OmegaConf

from conftest import compose
from resnet_cli import optim


@pytest.mark.parametrize("optimizer, scheduler", [("adam", "multistep"), ("adamw", "onecycle"), ("sgd", "step")])
def test_state_from_the_configs_loads_with_weights_only(optimizer, scheduler):
    # torch 2.6 keeps Adam's betas object in param_groups as given: a ListConfig would make every
    # checkpoint unloadable with weights_only=True (the lowest torch, .ci/lowest, found it).
    cfg = compose([f"optimizer={optimizer}", f"scheduler={scheduler}"])
    model = torch.nn.Linear(3, 2)
    groups = optim.param_groups(model, weight_decay_norm_bias=True, backbone_lr_scale=1.0)
    factory = instantiate(cfg.optimizer)
    assert not any(isinstance(v, Container) for v in optim.plain_factory(factory).keywords.values())
    opt = optim.build_optimizer(factory, groups)
    sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)  # as resnet-train passes it
    interval = sched_cfg.pop("interval")
    sched = optim.build_scheduler(instantiate(sched_cfg), opt, interval=interval, steps_per_epoch=4, epochs=3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["optimizer"]["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
