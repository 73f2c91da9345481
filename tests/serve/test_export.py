"""``export``: the artifact's contents, the encoder loaded by plain torch in a process that cannot
import fearec_dist, exact top-k equal to the checkpoint's ``full_scores``, and the checks that
refuse a tampered export."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.serve.conftest import N_ITEMS, raw_item

# Runs with ``python -I -S``: no site processing, so the editable install's import hook (a .pth
# file) is not there; only the directory holding torch is added. It fails if fearec_dist imports.
LOADER = textwrap.dedent(
    """
    import importlib.util, sys
    sys.path.append(sys.argv[1])
    assert importlib.util.find_spec("fearec_dist") is None, "fearec_dist is importable"
    import numpy as np, torch
    program = torch.export.load(sys.argv[2])
    data = np.load(sys.argv[3])
    encoder = program.module()
    with torch.no_grad():
        out = encoder(torch.from_numpy(data["item_seq"]), torch.from_numpy(data["seq_len"]))
        one = encoder(torch.from_numpy(data["item_seq"][:1]), torch.from_numpy(data["seq_len"][:1]))
    np.save(sys.argv[4], out.numpy())
    np.save(sys.argv[4].replace(".npy", "-one.npy"), one.numpy())
    """
)


@pytest.mark.parametrize("name", ["sasrec", "fearec_official"])
def test_encoder_loads_without_fearec_dist(make_export, tmp_path, name):
    run, out = make_export(name)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, item_seq=run.test_seq.numpy(), seq_len=run.test_len.numpy())
    script = tmp_path / "load.py"
    script.write_text(LOADER)
    site = str(Path(torch.__file__).resolve().parents[1])
    result = tmp_path / "out.npy"
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(script),
            site,
            str(out / "encoder.pt2"),
            str(inputs),
            str(result),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from fearec_dist.models import get_spec

    with torch.no_grad():
        want = get_spec(name).encode(run.model, {"item_seq": run.test_seq, "seq_len": run.test_len})
    got = np.load(result)
    assert got.shape == (len(run.test_seq), 16) and len(run.test_seq) > 100
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "out-one.npy"), want[:1].numpy(), atol=1e-5)


def test_manifest_and_items(make_export):
    run, out = make_export("bert4rec")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["export_version"] == 1 and manifest["model"] == "bert4rec"
    assert manifest["n_items"] == N_ITEMS and manifest["hidden_size"] == 16
    assert manifest["max_seq_len"] == 12 and manifest["has_bias"] is True
    assert manifest["vocab_checksum"].startswith("sha256:")
    assert manifest["metrics"]["test"] == {"test/hr@10": 0.25}
    assert manifest["encoder"]["format"] == "torch.export"
    assert manifest["encoder"]["max_abs_diff_vs_model"] < 1e-5
    assert "dot product" in manifest["scoring"] and manifest["index"] is None
    assert manifest["protocol"]["split"] == "loo"  # the run's protocol (docs/evaluation.md)
    items = pq.read_table(out / "items.parquet")
    assert items.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert items.column("id").to_pylist() == list(range(1, N_ITEMS + 1))
    assert items.column("raw").to_pylist() == [raw_item(i) for i in range(1, N_ITEMS + 1)]
    weights = run.model.item_embedding.weight[1 : N_ITEMS + 1].detach().numpy()
    np.testing.assert_array_equal(np.stack(items.column("embedding").to_numpy(False)), weights)
    np.testing.assert_array_equal(
        items.column("bias").to_numpy(), run.model.output_bias[1:].detach().numpy()
    )


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "fearec_official"])
def test_exact_topk_equals_full_scores(make_export, name):
    from fearec_dist.models import get_spec
    from fearec_dist.serve.artifact import load_export
    from fearec_dist.serve.recommend import Histories, recommend, recommend_batch

    run, out = make_export(name)
    export = load_export(str(out))
    with torch.no_grad():
        scores = get_spec(name).full_scores(
            run.model, {"item_seq": run.test_seq, "seq_len": run.test_len}
        )
    scores[:, 0] = -torch.inf  # padding
    want_s, want_i = scores.topk(10, dim=1)
    lengths = run.test_len.numpy()
    items = np.concatenate([row[:n] for row, n in zip(run.test_seq.numpy(), lengths)])
    hist = Histories(np.r_[0, np.cumsum(lengths)], items, np.zeros(len(lengths), np.int64))
    recs = recommend_batch(export, hist, 10)
    np.testing.assert_array_equal(recs.ids, want_i.numpy())
    np.testing.assert_allclose(recs.scores, want_s.numpy(), atol=1e-4)
    # the one-history path, in raw ids
    one = recommend(export, [raw_item(int(i)) for i in items[: lengths[0]]], k=10)
    assert one.item_ids == [raw_item(int(i)) for i in want_i[0]]
    assert one.source == "model" and one.n_unknown == 0


def test_chunked_topk_and_exclude_seen():
    from fearec_dist.serve.recommend import Histories, exact_topk

    gen = torch.Generator().manual_seed(0)
    seq_repr, weights = torch.randn(5, 8, generator=gen), torch.randn(300, 8, generator=gen)
    bias = torch.randn(300, generator=gen)
    want_s, want_i = (seq_repr @ weights.T + bias).topk(7, dim=1)
    ids, scores = exact_topk(seq_repr, weights, bias, 7, chunk=5 * 13)  # 13 items per chunk
    np.testing.assert_array_equal(ids, want_i.numpy() + 1)
    np.testing.assert_allclose(scores, want_s.numpy(), atol=1e-5)
    seen = Histories(np.array([0, 2, 2, 2, 2, 2]), ids[0, :2].copy(), np.zeros(5, np.int64))
    ids2, _ = exact_topk(seq_repr, weights, bias, 7, exclude=seen, chunk=5 * 13)
    np.testing.assert_array_equal(ids2[0, :5], ids[0, 2:])
    np.testing.assert_array_equal(ids2[1:], ids[1:])


def test_tampered_table_is_refused(make_export, tmp_path):
    import shutil

    from fearec_dist.serve.artifact import ServeError, load_export

    _, out = make_export("sasrec")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    table = pq.read_table(bad / "items.parquet")
    raw = table.column("raw").to_pylist()
    raw[3], raw[4] = raw[4], raw[3]  # two items swapped: every id would name the other item
    pq.write_table(table.set_column(1, "raw", pa.array(raw)), bad / "items.parquet")
    with pytest.raises(ServeError, match=r"items\.parquet: the vocabulary checksum .* does not"):
        load_export(str(bad))
    (bad / "manifest.json").unlink()
    with pytest.raises(ServeError, match="no manifest.json"):
        load_export(str(bad))


def test_export_refuses_a_foreign_output(make_run, tmp_path):
    from fearec_dist.serve.artifact import ServeError
    from fearec_dist.serve.export import export_run

    run = make_run("sasrec")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ServeError, match="notes.txt, which is not an export"):
        export_run(str(run.dir), str(tmp_path), say=lambda *_: None)
    assert (tmp_path / "notes.txt").exists()


def test_cli_export_default_output(make_run, capsys):
    from fearec_dist.cli import main

    run = make_run("sasrec")
    assert main(["export", "--run", str(run.dir / "checkpoint_000001")]) == 0
    assert (run.dir / "export" / "manifest.json").exists()  # beside the checkpoint, in the run
    assert "export written to" in capsys.readouterr().out
