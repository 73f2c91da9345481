"""``recommend`` on bad input (unknown ids, empty histories) and the popularity fallback, through
the functions and through the CLI; the popularity counts against the leave-one-out split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.serve.conftest import raw_item


def test_training_counts_skip_valid_and_test_targets():
    from fearec_dist.data.popularity import held_out_per_user, training_counts

    # users of 1, 2, 3, 4 and 5 items: LOO holds out 0, 0, 1 (test), 2, 2 items at the end;
    # a single item makes no training example
    seqs = [[1], [2, 3], [4, 5, 6], [1, 2, 3, 4], [5, 5, 6, 1, 2]]
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    items = np.concatenate(seqs)
    assert held_out_per_user(np.diff(offsets)).tolist() == [0, 0, 1, 2, 2]
    counts = training_counts(offsets, items, 6)
    # training parts: [], [2, 3], [4, 5], [1, 2], [5, 5, 6]
    assert counts.tolist() == [0, 1, 2, 1, 1, 3, 1]


def test_training_counts_match_the_loo_training_examples():
    """Every item the train split contains (histories and targets) and nothing else."""
    from fearec_dist.data.popularity import training_counts
    from fearec_dist.data.sequences import build_loo_examples
    from tests.serve.conftest import random_sequences

    seqs = random_sequences(60, 40, seed=5)
    offsets = np.cumsum([0] + [len(s) for s in seqs])
    items = np.concatenate(seqs)
    train = build_loo_examples(offsets, items, np.arange(60), max_seq_len=100)["train"]
    want = np.zeros(41, dtype=np.int64)
    for u in range(60):  # the longest training sample of a user is its whole training part
        rows = np.flatnonzero(train["user"] == u)
        if len(rows):
            last = rows[np.argmax(train["length"][rows])]
            part = [*train["history"][last][: train["length"][last]], train["target"][last]]
            np.add.at(want, part, 1)
    np.testing.assert_array_equal(training_counts(offsets, items, 40), want)


def test_popularity_ranking_ties_and_exclude():
    from fearec_dist.data.popularity import popularity_ranking

    counts = np.array([0, 3, 5, 5, 1, 0])
    ids, n = popularity_ranking(counts, 4)
    assert ids.tolist() == [2, 3, 1, 4] and n.tolist() == [5, 5, 3, 1]  # ties: smaller id
    ids, _ = popularity_ranking(counts, 10, exclude=np.array([2, 4]))
    assert ids.tolist() == [3, 1, 5]  # never padding 0


def test_unknown_ids_dropped_counted_or_strict(make_export):
    from fearec_dist.serve.artifact import ServeError, load_export
    from fearec_dist.serve.recommend import recommend

    run, out = make_export("sasrec")
    export = load_export(str(out))
    history = [raw_item(int(i)) for i in run.test_seq[0, : run.test_len[0]]]
    clean = recommend(export, history, k=5)
    noisy = recommend(export, ["nope-1", *history, "nope-2"], k=5)
    assert noisy.item_ids == clean.item_ids  # unknown ids are simply not there
    assert noisy.n_unknown == 2 and noisy.unknown == ["nope-1", "nope-2"]
    assert noisy.n_known == clean.n_known == len(history)
    with pytest.raises(ServeError, match=r"2 item id\(s\) not in the export's vocabulary: nope-1"):
        recommend(export, ["nope-1", *history, "nope-2"], k=5, strict=True)


def test_empty_history_error_or_popularity(make_export):
    from fearec_dist.serve.artifact import ServeError, load_export
    from fearec_dist.serve.recommend import recommend

    _, out = make_export("sasrec")
    export = load_export(str(out))
    with pytest.raises(ServeError, match="empty history: no item ids given.*--fallback popularity"):
        recommend(export, [], k=5)
    with pytest.raises(ServeError, match="none of its 2 ids is in the export's vocabulary"):
        recommend(export, ["x", "y"], k=5)
    pop = recommend(export, ["x", "y"], k=5, fallback="popularity")
    assert pop.source == "popularity" and pop.n_unknown == 2
    order = np.argsort(-export.train_counts[1:], kind="stable")[:5] + 1
    assert pop.item_ids == [raw_item(int(i)) for i in order]
    assert pop.scores == sorted(pop.scores, reverse=True)


def test_cli_recommend_one_history(make_export, capsys):
    from fearec_dist.cli import main

    run, out = make_export("sasrec")
    history = " ".join(raw_item(int(i)) for i in run.test_seq[1, : run.test_len[1]])
    assert (
        main(["recommend", "--export", str(out), "--history", f"{history} ghost", "-k", "3"]) == 0
    )
    text = capsys.readouterr()
    assert "dropped 1 unknown item id(s): ghost" in text.err
    lines = text.out.strip().splitlines()
    assert lines[0].startswith("top 3 for a history of") and "exact" in lines[0]
    assert len(lines) == 5 and lines[2].split()[0] == "1"

    assert main(["recommend", "--export", str(out), "--history", "ghost", "--json",
                 "--fallback", "popularity"]) == 0  # fmt: skip
    answer = json.loads(capsys.readouterr().out)
    assert answer["source"] == "popularity" and len(answer["item_ids"]) == 10

    assert main(["recommend", "--export", str(out), "--history", "ghost", "--strict"]) == 1
    assert "not in the export's vocabulary: ghost" in capsys.readouterr().err
    assert main(["recommend", "--export", str(out), "--history", "ghost", "--ann"]) == 1
    assert "has no ANN index; export it with --index" in capsys.readouterr().err
    assert main(["recommend", "--export", str(out), "--input", str(run.prepared)]) == 1
    assert "--input needs --output" in capsys.readouterr().err
