import os

import pytest

from metric.datasets.gldv2 import convert_gldv2
from metric.datasets.listfile import read_list
from metric.utils.errors import DataError
from tests.helpers import run_py


def test_train_csv_and_clean_csv(tmp_path):
    full = tmp_path / "train.csv"
    full.write_text("id,url,landmark_id\nabc1,http://x,7\nabd2,http://x,7\nbcd3,http://x,3\nzzz9,http://x,12\n")
    s = convert_gldv2(str(full), str(tmp_path / "out"), min_images=1)
    assert s["train_classes"] == 3 and s["train_images"] == 4
    lines = (tmp_path / "out" / "train_list.txt").read_text().splitlines()
    assert lines[0] == "train/b/c/d/bcd3.jpg 0" and "train/a/b/c/abc1.jpg 1" in lines
    clean = tmp_path / "train_clean.csv"
    clean.write_text("landmark_id,images\n7,abc1 abd2\n3,bcd3\n12,zzz9\n")
    s = convert_gldv2(str(clean), str(tmp_path / "out2"), min_images=2)
    assert s["train_classes"] == 1 and s["dropped_classes"] == 2
    items = read_list(str(tmp_path / "out2" / "train_list.txt"), num_classes=1, check_files=False)
    assert [lab for _, lab in items] == [0, 0]


def test_val_classes_are_held_out(tmp_path):
    csv = tmp_path / "train_clean.csv"
    csv.write_text("landmark_id,images\n" + "".join(f"{c},{c:03d}a {c:03d}b\n" for c in range(10)))
    s = convert_gldv2(str(csv), str(tmp_path / "o"), val_classes=3, seed=1)
    assert (s["train_classes"], s["val_classes"]) == (7, 3)
    train = (tmp_path / "o" / "train_list.txt").read_text()
    val = (tmp_path / "o" / "val_list.txt").read_text()
    assert not {line.split()[0] for line in train.splitlines()} & {line.split()[0] for line in val.splitlines()}


def test_bad_csv_is_a_data_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(DataError, match="expected columns"):
        convert_gldv2(str(bad), str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o" / "train_list.txt")


@pytest.mark.slow
def test_bad_csv_exits_2(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    proc = run_py(["tools/gldv2_to_list.py", "--csv", str(bad), "--output", str(tmp_path / "o")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert "expected columns" in proc.stderr
    assert not os.path.exists(tmp_path / "o" / "train_list.txt")
