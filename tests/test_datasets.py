"""Dataset loading and the user interleaving rule."""

from __future__ import annotations

import numpy as np
import pytest

from stream_app.cli import main
from stream_app.datasets import guess_format, interleave, load


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
    lines = [{"user_id": "u1", "item_id": "x", "kind": "view", "ts": 2.0, "event_id": "mon-1"},
             {"user_id": "u1", "item_id": "y", "kind": "view", "ts": 1.0}]
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


def produce_fails(path, capsys, monkeypatch) -> str:
    """``streamrec produce PATH``'s one-line error, given before anything is sent."""
    def sent(*args, **kwargs):
        raise AssertionError(f"{path} was read, and its events sent")

    monkeypatch.setenv("STREAMREC_BROKER", "127.0.0.1:1")  # nothing listens there
    monkeypatch.setattr("stream_app.client.replay", sent)
    assert main(["produce", str(path)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("streamrec produce: ") and error.count("\n") == 1, error
    return error


EVENT = '{"user_id": "u1", "item_id": "a", "kind": "view", "ts": 1.5}\n'


@pytest.mark.parametrize("name, text, where, what", [
    ("other.csv", "user,item,rating,time\n1,2,4.0,10\n", ":1:", "lacks userId, movieId"),
    ("short.csv", "userId,movieId,rating,timestamp\n1,2,4.0,10\n1,3\n", ":3:", "2 fields"),
    ("typo.csv", "userId,movieId,rating,timestamp\n1,2,four,10\n", ":2:", "'four'"),
    ("erasure.jsonl", EVENT + '{"user_id": "u1", "forget": true}\n', ":2:", "an erasure"),
    ("list.jsonl", EVENT + "[1, 2]\n", ":2:", "must be a JSON object"),
    ("text.jsonl", EVENT + "\n" + '"u1 a"\n', ":3:", "must be a JSON object"),
])
def test_a_malformed_file_is_refused_with_its_name_its_line_and_what_is_wrong(
        tmp_path, capsys, monkeypatch, name, text, where, what):
    """They raised KeyError or TypeError: a traceback, without the file's line."""
    path = tmp_path / name
    path.write_text(text)
    error = produce_fails(path, capsys, monkeypatch)
    assert f"{path}{where}" in error and what in error


def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path):
    """Excel writes one before a CSV's header (KeyError: 'userId'); a text file's joined the
    first user's id."""
    rows = "userId,movieId,rating,timestamp\r\n1,10,4.0,5\r\n2,11,3.0,6\r\n"
    (tmp_path / "plain.csv").write_text(rows, newline="")
    (tmp_path / "excel.csv").write_text(rows, encoding="utf-8-sig", newline="")
    plain, excel = load(tmp_path / "plain.csv"), load(tmp_path / "excel.csv")
    assert [e.pop("event_id") != "" for e in excel.events()] == [True, True]
    assert [e | {"event_id": ""} for e in plain.events()] == [
        e | {"event_id": ""} for e in excel.events()]
    (tmp_path / "seq.txt").write_text("u1 a b\nu2 c d e\n", encoding="utf-8-sig")
    assert set(load(tmp_path / "seq.txt").users) == {"u1", "u2"}


def test_a_file_that_is_not_utf8_is_refused_by_name(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 a b\nu2 c\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8"):
        load(tmp_path / "latin.txt")


@pytest.mark.parametrize("name, text, why", [
    ("u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n", "4 fields"),
    ("ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n", "'::'"),
    ("pairs.txt", "u1,a\nu1,b\nu2,a\n", "','"),
    ("events.json", EVENT, "starts as JSON"),
    ("quoted.txt", '"u1" "a"\n', "starts as JSON"),
    ("users.txt", "u1\nu2\n", "no line has an item"),
    ("blank.txt", "\n\n", "no lines"),
    ("empty.jsonl", "", "no events when read as jsonl"),
    ("header.csv", "userId,movieId,rating,timestamp\n", "no events when read as movielens"),
])
def test_a_file_the_guess_cannot_read_for_sure_is_refused_and_asks_for_its_format(
        tmp_path, capsys, monkeypatch, name, text, why):
    """Read as sequences, u.data's ratings and times were items, and ratings.dat and comma
    separated pairs gave no events, and the replay said it had succeeded."""
    path = tmp_path / name
    path.write_text(text)
    error = produce_fails(path, capsys, monkeypatch)
    assert why in error and "--format" in error


def test_the_shared_datasets_are_still_guessed(shared_data):
    assert [guess_format(shared_data / name) for name in (
        "amazon-beauty/Beauty.txt", "amazon-toys/Toys_and_Games.txt",
        "amazon-video-games/Video.txt", "ml-latest-small/ratings.csv")] == [
        "sequences", "sequences", "pairs", "movielens"]


@pytest.mark.parametrize("line, why", [
    ('{"user_id": null, "item_id": "a", "kind": "view", "ts": 2}', "user_id"),
    ('{"user_id": 7, "item_id": "a", "kind": "view", "ts": 2}', "user_id"),
    ('{"user_id": "u1", "item_id": 8, "kind": "view", "ts": 2}', "item_id"),
    ('{"user_id": "u1", "item_id": "a", "ts": 2}', "kind"),
    ('{"user_id": "u1", "item_id": "a", "kind": "view", "ts": "2"}', "ts must be a number"),
    ('{"v": 2, "user_id": "u1", "item_id": "a", "kind": "view", "ts": 2}', "bad_version"),
    ('{"user_id": "u1", "item_id": "a", "kind": "view", "ts": 2, "event_id": ""}', "event_id"),
])
def test_a_jsonl_line_a_worker_would_refuse_is_not_repaired_the_file_is_refused(
        tmp_path, line, why):
    """They were sent repaired: a null user_id as "None", a number as a string, no kind as a
    view, a string ts as a number, and v 2 as v 1."""
    path = tmp_path / "log.jsonl"
    path.write_text(EVENT + line + "\n" + EVENT)
    with pytest.raises(ValueError, match=f"log.jsonl:2: .*{why}"):
        load(path)


def test_a_jsonl_log_takes_any_kind_and_any_time_the_worker_or_bootstrap_judges_them(tmp_path):
    lines = ['{"user_id": "u1", "item_id": "a", "kind": "teleport", "ts": 1.7e12}',
             '{"v": 1, "user_id": "u1", "item_id": "b", "kind": "view", "ts": 3, "x": [1]}']
    (tmp_path / "log.jsonl").write_text("\n".join(lines))
    log = load(tmp_path / "log.jsonl")
    assert list(log.kinds) == ["view", "teleport"] and list(log.items) == ["b", "a"]


def test_blank_lines_in_a_sequences_file_are_skipped(tmp_path):
    """One failed with "not enough values to unpack"."""
    (tmp_path / "seq.txt").write_text("u1 a b c\n\nu2 d e\n\n\n")
    for fmt in (None, "sequences"):
        log = load(tmp_path / "seq.txt", fmt)
        assert list(log.items[log.users == "u1"]) == ["a", "b", "c"] and len(log) == 5
