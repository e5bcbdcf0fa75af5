"""tools/evaluate.py: the three modes write exactly their JSON keys; bad inputs exit 2 with one line."""

import json
import pickle

import numpy as np
import pytest

from metric.retrieval.metrics import labelled_metrics, rank_index, revisited_map
from metric.retrieval.store import save_features
from tests.helpers import call_tool, run_py, unit_vectors


def run(argv, capsys):
    """Run the tool in-process; returns (exit status, stdout, non-blank stderr lines)."""
    status, out, err = call_tool("evaluate", argv, capsys)
    return status, out, [line for line in err.splitlines() if line.strip()]


def assert_user_error(status, err, match):
    assert status == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert match in errors[0], errors[0]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def glr_files(tmp_path):
    solution = tmp_path / "retrieval_solution.csv"
    solution.write_text("id,images,Usage\nq1,a b,Public\nq2,c,Private\nq3,None,Ignored\nq4,d,Private\n")
    results = tmp_path / "results.csv"
    results.write_text("id,images\nq1,b x a\nq2,x c\nq3,a\n")
    return str(results), str(solution)


@pytest.fixture
def revisited_files(tmp_path):
    rng = np.random.default_rng(0)
    imlist = [f"im{i:03d}" for i in range(30)]
    qimlist = [f"query{i}" for i in range(4)]
    gnd = [
        {
            "easy": rng.choice(30, 3, replace=False).tolist(),
            "hard": [int(i)],
            "junk": [int(i) + 1],
            "bbx": [0.0, 0.0, 10.0, 10.0],
        }
        for i in (5, 7, 9, 11)
    ]
    gt = tmp_path / "gnd_test.pkl"
    gt.write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    x, q = unit_vectors(rng, 30, 8), unit_vectors(rng, 4, 8)
    # stores in another order, with 2 distractors in the index and an extra query
    order = rng.permutation(30)
    distractors = unit_vectors(rng, 2, 8)
    save_features(
        str(tmp_path / "index"), np.concatenate([x[order], distractors]), [imlist[i] for i in order] + ["d1", "d2"]
    )
    save_features(
        str(tmp_path / "query"), np.concatenate([q[::-1], unit_vectors(rng, 1, 8)]), qimlist[::-1] + ["other"]
    )
    expected = revisited_map(rank_index(q, np.concatenate([x, distractors])), gnd)
    return str(tmp_path / "query"), str(tmp_path / "index"), str(gt), expected


@pytest.fixture
def labelled_files(tmp_path):
    rng = np.random.default_rng(1)
    q, x = unit_vectors(rng, 12, 8), unit_vectors(rng, 20, 8)
    q_lab, x_lab = rng.integers(0, 3, size=12), rng.integers(0, 3, size=20)
    save_features(str(tmp_path / "lq"), q, [f"q{i}" for i in range(12)])
    save_features(str(tmp_path / "lx"), x, [f"x{i}" for i in range(20)])
    # query labels keyed by id, index labels as a training list file (path label)
    (tmp_path / "q.txt").write_text("".join(f"q{i} {lab}\n" for i, lab in enumerate(q_lab)))
    (tmp_path / "x.txt").write_text(
        "# path label\n" + "".join(f"train/{lab}/x{i}.jpg {lab}\n" for i, lab in enumerate(x_lab))
    )
    expected = labelled_metrics(q, q_lab, x, x_lab)
    loo = labelled_metrics(q, q_lab)
    return (str(tmp_path / "lq"), str(tmp_path / "q.txt"), str(tmp_path / "lx"), str(tmp_path / "x.txt"), expected, loo)


# ---------------------------------------------------------------------------- modes


def test_glr_mode(glr_files, tmp_path, capsys):
    results, solution = glr_files
    out_json = tmp_path / "m.json"
    status, out, err = run(["--results", results, "--gt", solution, "--json", str(out_json)], capsys)
    assert status == 0, err
    data = json.loads(out_json.read_text())
    assert list(data) == ["mAP@100", "mP@k"]
    assert list(data["mAP@100"]) == ["Public", "Private", "All"]
    assert list(data["mP@k"]) == ["mP@1", "mP@5", "mP@10", "mP@100"]
    ap_q1 = (1 / 1 + 2 / 3) / 2
    assert data["mAP@100"]["Public"] == pytest.approx(ap_q1)
    assert data["mAP@100"]["Private"] == pytest.approx((1 / 2 + 0) / 2)
    assert data["mAP@100"]["All"] == pytest.approx((ap_q1 + 1 / 2) / 3)
    assert "mAP@100" in out and "Public" in out


def test_revisited_mode(revisited_files, tmp_path, capsys):
    query, index, gt, expected = revisited_files
    out_json = tmp_path / "r.json"
    status, out, err = run(["--query", query, "--index", index, "--gt", gt, "--json", str(out_json)], capsys)
    assert status == 0, err
    data = json.loads(out_json.read_text())
    assert list(data) == ["E", "M", "H"]
    for protocol in "EMH":
        assert list(data[protocol]) == ["mAP", "mP@1", "mP@5", "mP@10"]
        for key, value in expected[protocol].items():
            assert data[protocol][key] == pytest.approx(value, abs=1e-6)


def test_labelled_mode(labelled_files, tmp_path, capsys):
    query, q_labels, index, x_labels, expected, loo = labelled_files
    out_json = tmp_path / "l.json"
    argv = ["--query", query, "--query-labels", q_labels, "--index", index, "--index-labels", x_labels]
    status, out, err = run(argv + ["--json", str(out_json)], capsys)
    assert status == 0, err
    data = json.loads(out_json.read_text())
    assert list(data) == ["recall@1", "recall@5", "recall@10", "mAP@R"]
    for key, value in data.items():
        assert value == pytest.approx(expected[key], abs=1e-6)
    # leave-one-out within the query set
    status, out, err = run(["--query", query, "--query-labels", q_labels, "--json", str(out_json)], capsys)
    assert status == 0, err
    data = json.loads(out_json.read_text())
    assert data["mAP@R"] == pytest.approx(loo["mAP@R"], abs=1e-6)


# ---------------------------------------------------------------------------- bad inputs


def test_bad_argument_combinations(glr_files, revisited_files, labelled_files, tmp_path, capsys):
    results, solution = glr_files
    query, index, gt, _ = revisited_files
    lq, q_labels, lx, x_labels, _, _ = labelled_files
    cases = [
        ([], "nothing to score"),
        (["--results", results], "--results needs --gt"),
        (["--results", results, "--gt", solution, "--query", query], "--query cannot be used"),
        (["--query", query, "--gt", gt], "needs --index"),
        (["--query", query, "--index", index, "--gt", solution], "looks like a GLR solution"),
        (["--query", lq, "--query-labels", q_labels, "--index", lx], "--index-labels together"),
        (["--query", query, "--index", index], "nothing to score"),
        (["--results", results, "--gt", solution, "--json", str(tmp_path / "no" / "x.json")], "does not exist"),
    ]
    for argv, match in cases:
        status, _, err = run(argv, capsys)
        assert_user_error(status, err, match)


def test_bad_files(glr_files, revisited_files, labelled_files, tmp_path, capsys):
    results, solution = glr_files
    query, index, gt, _ = revisited_files
    lq, q_labels, lx, x_labels, _, _ = labelled_files
    bad_usage = tmp_path / "bad_usage.csv"
    bad_usage.write_text("id,images,Usage\nq1,a,Public\nq2,b,Hidden\n")
    unknown_query = tmp_path / "unknown.csv"
    unknown_query.write_text("id,images\nq1,a\nnot_a_query,b\n")
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    partial_labels = tmp_path / "partial.txt"
    partial_labels.write_text("q0 1\nq1 2\n")
    malformed_labels = tmp_path / "malformed.txt"
    malformed_labels.write_text("q0 1\nlonely\n")
    cases = [
        (["--results", str(tmp_path / "missing.csv"), "--gt", solution], "missing.csv"),
        (["--results", results, "--gt", str(tmp_path / "missing.csv")], "does not exist"),
        (["--results", results, "--gt", str(bad_usage)], "bad_usage.csv:3: unknown Usage 'Hidden'"),
        (["--results", str(unknown_query), "--gt", solution], "'not_a_query'"),
        (["--query", query, "--index", index, "--gt", str(evil)], "refusing"),
        (["--query", query, "--index", str(tmp_path / "nostore"), "--gt", gt], "nostore"),
        (["--query", index, "--index", index, "--gt", gt], "'query0'"),
        (["--query", lq, "--query-labels", str(partial_labels)], "no label"),
        (["--query", lq, "--query-labels", str(malformed_labels)], "malformed.txt:2:"),
    ]
    for argv, match in cases:
        status, _, err = run(argv, capsys)
        assert_user_error(status, err, match)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_subprocess_exit_code(glr_files):
    """The real command line: a user error is exactly one stderr line and exit status 2."""
    results, _ = glr_files
    bad = run_py(["tools/evaluate.py", "--results", results], timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: --results needs --gt, the retrieval_solution.csv ground truth"]
