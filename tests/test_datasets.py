"""Dataset loading and the user interleaving rule."""

from __future__ import annotations

import numpy as np
import pytest

from stream_app.datasets import interleave, load


def grouped(n_users=30, per_user=8):
    users = np.repeat([f"u{u}" for u in range(n_users)], per_user)
    items = np.array([f"{u}-{p}" for u in range(n_users) for p in range(per_user)])
    return users, items


def test_interleave_keeps_each_users_order_and_is_seeded():
    users, items = grouped()
    log = interleave(users, items, seed=3)
    for user in np.unique(users):
        mine = log.items[log.users == user]
        assert [int(i.split("-")[1]) for i in mine] == list(range(8))
        assert list(log.order[log.users == user]) == list(range(8))
    assert np.all(np.diff(log.ts) > 0)
    again = interleave(users, items, seed=3)
    assert list(again.items) == list(log.items)
    assert list(interleave(users, items, seed=4).items) != list(log.items)


def test_interleave_never_replays_user_after_user():
    users, items = grouped()
    log = interleave(users, items, seed=0)
    switches = np.count_nonzero(log.users[1:] != log.users[:-1])
    assert switches > len(users) * 0.8  # grouped order would switch only 29 times
    first_half_users = set(log.users[: len(log) // 2])
    assert len(first_half_users) == 30  # every user is active early


def test_loaders_read_the_three_formats(tmp_path, shared_data):
    (tmp_path / "seq.txt").write_text("1 5 6 7\n2 8 5\n")
    (tmp_path / "pairs.txt").write_text("1 5\n1 6\n2 8\n2 5\n")
    for name in ("seq.txt", "pairs.txt"):
        log = load(tmp_path / name)
        assert sorted(zip(log.users, log.items)) == sorted(
            [("1", "5"), ("1", "6"), ("2", "8"), ("2", "5")] + ([("1", "7")] if name == "seq.txt" else []))
        assert list(log.items[log.users == "2"]) == ["8", "5"]
        assert set(log.kinds) == {"view"}
    movielens = load(shared_data / "ml-latest-small")
    assert len(movielens) == 100_836 and np.all(np.diff(movielens.ts) >= 0)
    assert set(np.unique(movielens.kinds)) == {"click", "view"}
    events = list(__import__("itertools").islice(movielens.events(), 2))
    assert {"user_id", "item_id", "kind", "ts", "event_id", "v"} == set(events[0])


def test_event_ids_name_the_file_so_another_file_of_the_same_users_is_not_a_redelivery(
        tmp_path):
    """Ids were the user's place alone: a second file's first event of a user took the id of
    the first file's, and the worker ignored it as a redelivery."""
    import json

    from stream_app.datasets import content_tag

    first, second = tmp_path / "day1.txt", tmp_path / "day2.txt"
    first.write_text("u1 a\nu1 b\n")
    second.write_text("u1 c\n")
    ids_first = [e["event_id"] for e in load(first).events()]
    ids_second = [e["event_id"] for e in load(second).events()]
    assert len(set(ids_first) | set(ids_second)) == 3
    assert ids_first == [e["event_id"] for e in load(first).events()]  # a replay repeats them
    assert ids_first[0] == f"{content_tag(first)}:u1:0"
    lines = [{"user_id": "u1", "item_id": "x", "ts": 2.0, "event_id": "mon-1"},
             {"user_id": "u1", "item_id": "y", "ts": 1.0}]
    (tmp_path / "own.jsonl").write_text("\n".join(map(json.dumps, lines)))
    events = list(load(tmp_path / "own.jsonl").events())
    assert [e["item_id"] for e in events] == ["y", "x"]
    assert events[1]["event_id"] == "mon-1"  # its own, kept
    assert events[0]["event_id"].endswith(":u1:0")
    long_user = "u" * 250  # a valid user id, whose made id would pass 256 characters
    (tmp_path / "long.txt").write_text(f"{long_user} a\n{long_user} b\n")
    made = [e["event_id"] for e in load(tmp_path / "long.txt").events()]
    assert len(set(made)) == 2 and all(len(made_id) <= 256 for made_id in made)


def test_the_format_is_guessed_from_more_than_the_first_line(tmp_path):
    (tmp_path / "seq.txt").write_text("u1 a\nu2 b c d e\n")
    assert len(load(tmp_path / "seq.txt")) == 5
    (tmp_path / "timed.txt").write_text("u1 a 1700000000\n")
    with pytest.raises(ValueError, match="3 fields"):
        load(tmp_path / "timed.txt", "pairs")
