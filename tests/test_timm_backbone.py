"""MODEL.TYPE timm: feature maps from any timm model, its own state dicts, clear errors."""

import builtins

import pytest
import torch

from metric import build_model, load_cfg, load_weights
from metric.utils.errors import ConfigError

timm = pytest.importorskip("timm")

# timm's tiny test models (a few hundred thousand parameters, 160 px default input).
HEAD = ["MODEL.HEADS.IN_FEAT", "0", "MODEL.HEADS.REDUCTION_DIM", "8", "MODEL.HEADS.NUM_CLASSES", "3"]


def _cfg(name, *extra):
    return load_cfg(None, ["MODEL.TYPE", "timm", "MODEL.TIMM.NAME", name, *HEAD, *extra])


@pytest.mark.parametrize(
    "name,channels,grid",
    [
        ("test_resnet", 96, 5),  # NCHW CNN
        ("test_mambaout", 256, 5),  # NHWC output, permuted; its head's MLP is part of the backbone
        ("test_vit", 64, 10),  # tokens: class token dropped, patches on the grid
    ],
)
def test_feature_maps_and_training(name, channels, grid):
    torch.manual_seed(0)
    model = build_model(_cfg(name))
    assert model.backbone.out_channels == channels
    x = torch.randn(2, 3, 160, 160)
    model.train()
    logits, emb = model(x, torch.tensor([0, 2]))
    (logits.logsumexp(1).mean() + emb.pow(2).mean()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        assert model.backbone(x).shape == (2, channels, grid, grid)
        assert model(x).shape == (2, 8)


def test_vit_tokens_keep_their_order_on_the_grid():
    model = build_model(_cfg("test_vit")).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        tokens = model.backbone.model(x)
        fmap = model.backbone(x)
    torch.testing.assert_close(fmap[0, :, 0, 1], tokens[0, 2])  # token 0 is the class token
    torch.testing.assert_close(fmap[0, :, 1, 0], tokens[0, 1 + 10])


def test_timm_state_dict_loads_by_its_own_names(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("test_convnext", num_classes=5)  # with its classifier
    path = str(tmp_path / "convnext.pth")
    torch.save(src.state_dict(), path)
    model = build_model(_cfg("test_convnext"))
    missing, unexpected = load_weights(model, path)
    assert all(k.startswith("head.") and not k.startswith("head.model") for k in missing) and unexpected == []
    torch.testing.assert_close(model.backbone.model.stem[0].weight, src.stem[0].weight)


def test_missing_timm_is_one_line_config_error(monkeypatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ConfigError, match=r"^MODEL.TYPE timm needs the optional package timm: pip install timm$"):
        build_model(_cfg("test_resnet"))


def test_model_that_cannot_give_a_feature_map():
    with pytest.raises(ConfigError, match="timm model deit_tiny_distilled_patch16_224 cannot return a feature map"):
        build_model(_cfg("deit_tiny_distilled_patch16_224"))


def test_unknown_or_empty_name():
    with pytest.raises(ConfigError, match=r"MODEL.TIMM.NAME='resnet5O' is not a timm model \(did you mean") as err:
        build_model(_cfg("resnet5O"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="MODEL.TIMM.NAME=''.*a timm model name"):
        load_cfg(None, ["MODEL.TYPE", "timm"])
