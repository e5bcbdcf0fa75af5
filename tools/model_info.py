"""Print the FLOPs, parameters and activations of a config's model, or list the backbones.

python tools/model_info.py --cfg configs/metric/resnst269_8gpu.yaml
python tools/model_info.py MODEL.TYPE resnest50 TRAIN.IM_SIZE 320
python tools/model_info.py --list
"""

import json

from metric.config import load_cfg
from metric.utils.cli import exit_tool, make_parser, run_tool


def main(argv=None):
    parser = make_parser("Print FLOPs / params / activations of the model of a config (one image of TRAIN.IM_SIZE).")
    parser.add_argument("--list", action="store_true", help="list the registered backbones, heads and layers")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args(argv)
    if args.list:
        from metric.modeling import registry as r

        for title, reg in (
            ("backbones (MODEL.TYPE)", r.BACKBONES),
            ("heads (MODEL.HEADS.NAME)", r.HEADS),
            ("pool layers (MODEL.HEADS.POOL_LAYER)", r.POOL_LAYERS),
            ("attention blocks (MODEL.HEADS.ATTENTION)", r.ATTENTIONS),
            ("margin layers (MODEL.HEADS.CLS_LAYER)", r.MARGIN_LAYERS),
            ("losses (MODEL.LOSSES.NAME)", r.LOSSES),
        ):
            print(f"{title}: {', '.join(reg.names())}")
        return 0
    cfg = load_cfg(args.cfg_file, args.opts)
    from metric.modeling import build_model
    from metric.modeling.complexity import format_complexity, model_complexity, si_units

    c = model_complexity(build_model(cfg), cfg.TRAIN.IM_SIZE)
    if args.json:
        print(json.dumps({"type": cfg.MODEL.TYPE, "im_size": cfg.TRAIN.IM_SIZE, **c}))
    else:
        name = cfg.MODEL.TYPE + (f"-{cfg.MODEL.DEPTH}" if cfg.MODEL.TYPE in ("resnet", "resnest") else "")
        if cfg.MODEL.TYPE == "timm":
            name += f" {cfg.MODEL.TIMM.NAME}"
        if cfg.MODEL.TYPE == "vit":
            name += f" (width {cfg.MODEL.WIDTH}, {cfg.MODEL.LAYERS} blocks, patch {cfg.MODEL.PATCH_SIZE})"
        print(
            f"{name} at {cfg.TRAIN.IM_SIZE} px: {format_complexity(c)} "
            f"(backbone params {si_units(c['backbone_params'])})"
        )
    return 0


if __name__ == "__main__":
    exit_tool(run_tool(main))
