"""State that is read back is verified: checkpoints (checksum, finiteness, not-a-checkpoint files)
and a rerun of extraction over images that became readable (fault issue, section 2)."""

import hashlib
import json
import logging
import os
import re

import numpy as np
import pytest
import torch

from metric.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from metric.utils.errors import CheckpointError, FeatureStoreError
from tests.helpers import call_tool, tiny_opts


def _state(epoch, value=1.0):
    return {
        "epoch": epoch,
        "model_state": {"backbone.w": torch.full((4, 4), value)},
        "optimizer_state": {"state": {}, "param_groups": []},
        "cfg": "",
    }


def _flip_a_bit_in_tensor_data(path):
    """Flip one bit inside the stored tensor bytes (not the zip directory), as a bad disk would."""
    data = bytearray(open(path, "rb").read())
    marker = torch.full((4, 4), 2.0).numpy().tobytes()[:8]
    at = data.find(marker)
    assert at > 0
    data[at + 1] ^= 0x10
    open(path, "wb").write(bytes(data))


def test_checksum_round_trip_and_flipped_bits_refused(tmp_path):
    out = str(tmp_path)
    save_checkpoint(checkpoint_path(out, 0), _state(0, 1.0))
    save_checkpoint(checkpoint_path(out, 1), _state(1, 2.0))
    assert len(read_checkpoint(checkpoint_path(out, 1))["checksum"]) == 64
    _flip_a_bit_in_tensor_data(checkpoint_path(out, 1))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        read_checkpoint(checkpoint_path(out, 1))
    # auto-resume treats it like a truncated one: falls back to the previous complete checkpoint
    path, state = latest_checkpoint(out)
    assert path == checkpoint_path(out, 0) and state["epoch"] == 0


@pytest.mark.parametrize("content", [[1, 2, 3], {"epoch": 3, "note": "no tensors"}, torch.zeros(3), {}])
def test_a_file_that_is_not_a_checkpoint(tmp_path, content, caplog):
    out = str(tmp_path)
    save_checkpoint(checkpoint_path(out, 0), _state(0))
    torch.save(content, checkpoint_path(out, 1))
    with caplog.at_level(logging.WARNING):
        path, _ = latest_checkpoint(out)
    assert path == checkpoint_path(out, 0) and "not a training checkpoint" in caplog.text
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="not a checkpoint or state dict"):
        load_weights(model, checkpoint_path(out, 1))


def test_non_finite_values_are_refused(tmp_path):
    out = str(tmp_path)
    state = _state(0)
    state["model_state"]["backbone.w"][1, 2] = float("nan")
    save_checkpoint(checkpoint_path(out, 0), state)
    with pytest.raises(CheckpointError, match="backbone.w holds non-finite"):
        read_checkpoint(checkpoint_path(out, 0))
    plain = str(tmp_path / "imagenet.pth")  # a foreign state dict (no checksum) is checked too
    torch.save({"fc.weight": torch.tensor([float("inf")])}, plain)
    with pytest.raises(CheckpointError, match="non-finite"):
        read_checkpoint(plain)


@pytest.mark.slow
def test_corrupted_weights_file_is_one_line_exit_2(tiny_data, tmp_path, capsys):
    """Explicit TEST.WEIGHTS / TRAIN.WEIGHTS with a corrupted checkpoint: one line, exit 2."""
    from metric.config import load_cfg
    from metric.engine.trainer import train_model

    out = str(tmp_path / "run")
    train_model(load_cfg(None, tiny_opts(tiny_data, out, **{"OPTIM.MAX_EPOCH": 1, "TEST.DATASET": ""})))
    for h in list(logging.getLogger().handlers):
        if getattr(h, "baseFilename", "").startswith(out):
            logging.getLogger().removeHandler(h)
            h.close()
    weights = list_checkpoints(out)[-1]
    first = next(iter(read_checkpoint(weights)["model_state"].values()))
    data = bytearray(open(weights, "rb").read())
    at = data.find(first.numpy().tobytes()[:16])
    assert at > 0
    data[at + 2] ^= 0x01  # one bit of the first weight tensor
    open(weights, "wb").write(bytes(data))
    status, _, err = call_tool(
        "test_metric", tiny_opts(tiny_data, str(tmp_path / "eval"), **{"TEST.WEIGHTS": weights}), capsys
    )
    assert status == 2 and err.count("\n") == 1 and weights in err
    status, _, err = call_tool(
        "train_metric", tiny_opts(tiny_data, str(tmp_path / "ft"), **{"TRAIN.WEIGHTS": weights}), capsys
    )
    assert status == 2 and err.count("\n") == 1 and weights in err


# --- feature stores ------------------------------------------------------------------------------


def _store(tmp_path, n=6, d=4, name="store"):
    from metric.retrieval.store import save_features

    rng = np.random.default_rng(0)
    return save_features(str(tmp_path / name), rng.normal(size=(n, d)), [f"id{i}" for i in range(n)])


def _tamper(path, change_rows=None, ids=None, count=None, fix_digest=False):
    """Change a written store behind its writer's back; with ``fix_digest`` the meta's digest is
    recomputed, so that the other checks are what must catch it."""
    emb_path, ids_path, meta_path = (os.path.join(path, f) for f in ("embeddings.npy", "ids.txt", "meta.json"))
    emb = np.load(emb_path)
    if change_rows is not None:
        emb = change_rows(emb.copy())
    if count is not None:
        emb = emb[:count]
    np.save(emb_path, emb.astype(np.float32))
    id_list = open(ids_path, encoding="utf-8").read().splitlines() if ids is None else ids
    if count is not None:
        id_list = id_list[:count]
    with open(ids_path, "w", encoding="utf-8") as f:
        f.write("".join(i + "\n" for i in id_list))
    meta = json.load(open(meta_path, encoding="utf-8"))
    meta["count"] = len(id_list)
    if fix_digest:
        h = hashlib.sha256(np.ascontiguousarray(emb, np.float32).tobytes())
        h.update("".join(i + "\n" for i in id_list).encode())
        meta["digest"] = h.hexdigest()
    json.dump(meta, open(meta_path, "w", encoding="utf-8"))


def _negate_rows(e):
    e[2:4] *= -1
    return e


def _nan_row(e):
    e[3, 1] = np.nan
    return e


def _scale_row(e):
    e[1] *= 100
    return e


@pytest.mark.parametrize(
    "change, fix_digest, words",
    [
        (dict(change_rows=_negate_rows), False, "do not match the digest"),
        (dict(count=0), False, "do not match the digest"),
        (dict(change_rows=_nan_row), True, "row 3 (id 'id3') holds NaN"),
        (dict(change_rows=_scale_row), True, "row 1 (id 'id1') has norm 100"),
        (dict(ids=["id0", "id1", "", "id3", "id4", "id5"]), True, "empty or contains whitespace"),
        (dict(ids=["id0", "id1", "a b", "id3", "id4", "id5"]), True, "empty or contains whitespace"),
        (dict(ids=["id0", "id1", "id1", "id3", "id4", "id5"]), True, "repeats"),
    ],
)
def test_store_reader_verifies_what_meta_promises(tmp_path, change, fix_digest, words):
    from metric.retrieval.store import load_features

    path = _store(tmp_path)
    _tamper(path, fix_digest=fix_digest, **change)
    with pytest.raises(FeatureStoreError, match=re.escape(words)):
        load_features(path)


def test_store_is_read_once_per_process_and_no_verify_skips_it(tmp_path, monkeypatch, capsys):
    from metric.retrieval import store as store_mod

    path = _store(tmp_path)
    reads = []
    original_sha = store_mod.hashlib.sha256
    monkeypatch.setattr(store_mod.hashlib, "sha256", lambda *a: reads.append(1) or original_sha(*a))
    store_mod.load_features(path)
    store_mod.load_features(path)
    assert len(reads) == 1  # verified once; the second load knows this file
    _tamper(path, change_rows=_negate_rows)
    out = str(tmp_path / "results.csv")
    status, _, err = call_tool("search", ["--query", path, "--index", path, "--output", out, "--topk", "2"], capsys)
    assert status == 2 and "digest" in err and err.count("\n") == 1
    status, _, err = call_tool(
        "search", ["--query", path, "--index", path, "--output", out, "--topk", "2", "--no-verify"], capsys
    )
    assert status == 0, err
    with pytest.raises(FeatureStoreError, match="digest"):  # --no-verify of one call leaves no switch behind
        store_mod.load_features(path)
    store_mod.load_features(path, verify=False)  # the explicit parameter skips the check


def test_merge_refuses_non_finite_and_import_survives_huge_values(tmp_path):
    from metric.retrieval.store import import_features, merge_stores

    a, b = _store(tmp_path, name="a"), _store(tmp_path, name="b")
    _tamper(b, change_rows=_nan_row, fix_digest=True)
    with pytest.raises(FeatureStoreError, match="NaN"):
        merge_stores([a, b], str(tmp_path / "merged"))
    big = np.full((3, 4), 1e30, np.float32)
    np.save(tmp_path / "big.npy", big)
    (tmp_path / "ids.txt").write_text("x\ny\nz\n")
    # norms that overflow float32 are computed in float64: unit rows, not zero rows
    store = import_features(str(tmp_path / "big.npy"), str(tmp_path / "ids.txt"), str(tmp_path / "imported"))
    np.testing.assert_allclose(np.asarray(store.embeddings), np.full((3, 4), 0.5), atol=1e-6)
