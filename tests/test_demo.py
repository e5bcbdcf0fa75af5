"""The demo pipeline end to end, on a reduced demo data set: training must improve retrieval."""

import os

from metric.engine.demo import DEMO_CONFIG, format_table, run_demo


def test_demo_training_improves_heldout_retrieval(tmp_path):
    data_params = dict(num_train_classes=24, train_per_class=16, num_heldout_classes=8, queries_per_class=2,
                       index_per_class=6, num_distractor_classes=2, image_size=72)
    opts = ["DATA_DIR", str(tmp_path / "data"), "OUT_DIR", str(tmp_path / "out"), "MODEL.HEADS.NUM_CLASSES", "24",
            "OPTIM.MAX_EPOCH", "20", "TRAIN.EVAL_PERIOD", "0", "TRAIN.CHECKPOINT_PERIOD", "10",
            "DATA_LOADER.NUM_WORKERS", "0", "TRAIN.IM_SIZE", "56", "TEST.IM_SIZE", "64"]
    result = run_demo(DEMO_CONFIG, opts, data_params=data_params)
    before, after = result["untrained"], result["trained"]
    print(format_table(result))
    assert after["mAP@R"] > before["mAP@R"] + 0.05
    assert after["recall@1"] > before["recall@1"]
    assert os.path.basename(result["checkpoint"]) == "model_epoch_0020.pyth"
    # the retrieval half: stores, search, GLR mAP@100, gallery
    assert after["mAP@100"] > before["mAP@100"]
    assert os.path.isfile(result["gallery"])
    html = open(result["gallery"], encoding="utf-8").read()
    assert html.count("data:image/jpeg;base64") > 16
