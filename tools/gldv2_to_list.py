"""Convert Google Landmarks v2 train.csv / train_clean.csv into pymetric list files.

python tools/gldv2_to_list.py --csv /data/gldv2/train_clean.csv --output /data/gldv2 --min-images 2
"""

from metric.datasets.gldv2 import convert_gldv2
from metric.utils.cli import exit_tool, make_parser, run_tool


def main(argv=None):
    parser = make_parser("Convert GLDv2 train.csv / train_clean.csv to list files.", config=False)
    parser.add_argument("--csv", required=True, help="train.csv (id,url,landmark_id) or train_clean.csv")
    parser.add_argument("--output", required=True, help="data set folder (holds train/a/b/c/<id>.jpg)")
    parser.add_argument("--images-dir", default="train", help="image folder inside --output (default: train)")
    parser.add_argument("--min-images", type=int, default=1, help="drop classes with fewer images")
    parser.add_argument("--val-classes", type=int, default=0, help="hold out this many whole classes as val_list.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-files", action="store_true", help="count listed images that are missing")
    args = parser.parse_args(argv)
    s = convert_gldv2(
        args.csv, args.output, args.images_dir, args.min_images, args.val_classes, args.seed, args.check_files
    )
    print(
        f"train: {s['train_classes']} classes, {s['train_images']} images; "
        f"val: {s['val_classes']} classes, {s['val_images']} images; dropped {s['dropped_classes']} classes"
        + (f"; {s['missing_files']} listed images missing" if s["missing_files"] is not None else "")
    )
    print(f"set MODEL.HEADS.NUM_CLASSES {s['train_classes']}")


if __name__ == "__main__":
    exit_tool(run_tool(main))
