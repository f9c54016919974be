"""Checkpoints written as a base and deltas: what reads back is the state written last, after
any sequence of saves, new bases, crashes between a part and its head, and reads that meet a
new base."""

from __future__ import annotations

import json

import numpy as np
import pytest

import state.delta_checkpoint as delta_checkpoint
from state.delta_checkpoint import CHAIN_KEY, ChainWriter, Table, load_checkpoint
from state.gramian import DamagedCheckpoint, save_npz


class Tables:
    """Two tables that grow and change a few rows at a time, as the item model's do."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.rows = np.zeros((5000, 3))
        self.flags = np.zeros(5000, dtype=np.int64)
        self.pool = np.zeros((100, 2, 2), dtype=np.float32)
        self.used = {"rows": 3000, "pool": 60}
        self.changed = {"rows": set(), "pool": set()}
        self.step = 0

    def change(self) -> None:
        self.step += 1
        self.used["rows"] = min(self.used["rows"] + int(self.rng.integers(0, 12)), 5000)
        self.used["pool"] = min(self.used["pool"] + int(self.rng.integers(0, 3)), 100)
        for table, arrays in (("rows", (self.rows, self.flags)), ("pool", (self.pool,))):
            if not self.used[table]:
                continue
            picked = self.rng.integers(0, self.used[table], 4)
            for array in arrays:
                array[picked] = self.rng.normal(size=array[picked].shape) * 100
            self.changed[table].update(picked.tolist())

    def tables(self) -> dict[str, Table]:
        return {"rows": Table({"x": self.rows, "flag": self.flags}, self.used["rows"],
                              np.array(sorted(self.changed["rows"]), dtype=np.int64)),
                "pool": Table({"pool": self.pool}, self.used["pool"],
                              np.array(sorted(self.changed["pool"]), dtype=np.int64))}

    def save(self, writer: ChainWriter, head) -> str:
        kind = writer.save(head, self.tables(), {"step": np.array([self.step])})
        self.changed = {"rows": set(), "pool": set()}
        return kind

    def assert_read_back(self, head) -> None:
        data = load_checkpoint(head)
        assert int(data["step"][0]) == self.step
        np.testing.assert_array_equal(data["x"], self.rows[: self.used["rows"]])
        np.testing.assert_array_equal(data["flag"], self.flags[: self.used["rows"]])
        np.testing.assert_array_equal(data["pool"], self.pool[: self.used["pool"]])


def saved_three_times(head, seed: int) -> Tables:
    """Tables changed and saved three times at ``head``: a base and two deltas."""
    tables, writer = Tables(seed), ChainWriter()
    for _ in range(3):
        tables.change()
        tables.save(writer, head)
    return tables


def parts_beside(head) -> list[str]:
    return sorted(p.name for p in head.parent.iterdir() if p.name != head.name)


def chain_of(head) -> dict:
    return json.loads(str(load_checkpoint(head)[CHAIN_KEY]))


def test_bases_and_deltas_read_back_the_last_state_saved(tmp_path):
    head, tables = tmp_path / "model.npz", Tables(seed=0)
    writer, kinds = ChainWriter(compact_share=0.5, max_deltas=8), []
    for _ in range(60):
        tables.change()
        kinds.append(tables.save(writer, head))
        tables.assert_read_back(head)
        chain = chain_of(head)
        # the parts on the disk are the head's, and they weigh at most 1.5 bases
        assert parts_beside(head) == sorted(chain["parts"])
        assert sum(chain["sizes"][1:]) <= 0.5 * chain["sizes"][0]
        assert len(chain["parts"]) <= 9
    assert kinds[0] == "base" and kinds.count("delta") > 30 and kinds.count("base") > 3


def test_a_writer_that_read_the_chain_back_goes_on_with_it(tmp_path):
    head, tables = tmp_path / "model.npz", Tables(seed=1)
    tables.change()
    tables.save(ChainWriter(), head)
    for _ in range(5):
        writer = ChainWriter()  # a restart
        writer.continue_from(head, load_checkpoint(head))
        tables.change()
        assert tables.save(writer, head) == "delta"
        tables.assert_read_back(head)


def test_a_new_base_where_the_delta_cannot_follow(tmp_path):
    head, tables = tmp_path / "model.npz", Tables(seed=2)
    writer = ChainWriter()
    tables.change()
    tables.save(writer, head)
    tables.change()
    assert tables.save(writer, head) == "delta"
    assert tables.save(writer, tmp_path / "other.npz") == "base"  # another head
    tables.rows = np.zeros((5000, 4))  # the rows' width changed (another dimension)
    assert tables.save(writer, tmp_path / "other.npz") == "base"
    tables.assert_read_back(tmp_path / "other.npz")
    writer = ChainWriter()
    writer.continue_from(head, {"whole": np.zeros(1)})  # a whole checkpoint, as before deltas
    assert tables.save(writer, head) == "base"
    (tmp_path / chain_of(head)["parts"][0]).unlink()  # the base went missing
    tables.change()
    assert tables.save(writer, head) == "base"
    tables.assert_read_back(head)


def test_a_crash_between_a_part_and_its_head_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    head, tables = tmp_path / "model.npz", Tables(seed=3)
    writer = ChainWriter()
    tables.change()
    tables.save(writer, head)
    before = load_checkpoint(head)
    writes = []

    def crash_at_the_head(path, arrays):
        if path == head:
            raise OSError("no space left on device")
        writes.append(path.name)
        save_npz(path, arrays)

    monkeypatch.setattr(delta_checkpoint, "save_npz", crash_at_the_head)
    tables.change()
    with pytest.raises(OSError):
        tables.save(writer, head)
    monkeypatch.undo()
    after = load_checkpoint(head)
    assert sorted(after) == sorted(before)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array)
    assert writes[0] in parts_beside(head)  # the part written, named by no head
    writer = ChainWriter()
    writer.continue_from(head, after)
    tables.save(writer, head)  # what the crash lost is written by the next save
    tables.assert_read_back(head)
    assert writes[0] not in parts_beside(head)


def test_a_read_that_meets_a_new_base_reads_the_head_again(tmp_path, monkeypatch):
    head, tables = tmp_path / "model.npz", Tables(seed=4)
    writer = ChainWriter(compact_share=0.0)  # every save a new base: the last one's parts go
    tables.change()
    tables.save(writer, head)
    stale_head = delta_checkpoint.load_npz(head)
    tables.change()
    tables.save(writer, head)
    heads_read = []
    real = delta_checkpoint.load_npz

    def first_the_stale_head(path, skip=()):
        if path == head:
            heads_read.append(path)
            if len(heads_read) == 1:
                return stale_head  # read just before the save that removed its base
        return real(path, skip)

    monkeypatch.setattr(delta_checkpoint, "load_npz", first_the_stale_head)
    tables.assert_read_back(head)
    assert len(heads_read) == 2
    monkeypatch.setattr(delta_checkpoint, "load_npz",
                        lambda path, skip=(): stale_head if path == head else real(path, skip))
    with pytest.raises(DamagedCheckpoint, match="model.npz.part000001"):
        load_checkpoint(head)  # named twice: gone for good


def test_a_head_and_parts_that_do_not_add_up_are_damaged(tmp_path):
    head = tmp_path / "model.npz"
    saved_three_times(head, seed=5)
    data = load_checkpoint(head)
    chain = chain_of(head)
    for damage in ({"parts": ["../model.npz.part000001"]},  # a part outside the folder
                   {"tables": {**chain["tables"], "rows": {**chain["tables"]["rows"],
                                                           "rows": 10_000}}},  # rows in none
                   {"parts": chain["parts"][1:]},  # no base
                   {"tables": []}):  # not the tables
        save_npz(head, {**data, CHAIN_KEY: np.array(json.dumps({**chain, **damage}))})
        with pytest.raises(DamagedCheckpoint):
            load_checkpoint(head)
    save_npz(head, data)
    (tmp_path / chain["parts"][1]).write_bytes(b"not an npz")
    with pytest.raises(DamagedCheckpoint, match=f"{chain['parts'][1]}, a part of the checkpoint"):
        load_checkpoint(head)


def test_a_whole_checkpoint_reads_as_it_is(tmp_path):
    save_npz(tmp_path / "old.npz", {"x": np.arange(3)})
    data = load_checkpoint(tmp_path / "old.npz")
    assert list(data) == ["x"]
    assert load_checkpoint(tmp_path / "none.npz") is None


def test_names_that_clash_are_refused(tmp_path):
    table = Table({"x": np.zeros(2)}, 2, np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="distinct"):
        ChainWriter().save(tmp_path / "m.npz", {"t": table}, {"x": np.zeros(1)})


def test_a_read_leaves_out_the_arrays_it_skips(tmp_path):
    head = tmp_path / "model.npz"
    tables = saved_three_times(head, seed=6)
    data = load_checkpoint(head, skip={"pool", "flag"})
    assert "pool" not in data and "flag" not in data
    np.testing.assert_array_equal(data["x"], tables.rows[: tables.used["rows"]])


def test_a_part_that_vanishes_as_it_is_opened_reads_as_gone(tmp_path, monkeypatch):
    """Between a part's listing and its opening a writer may remove it: that is the read
    again of :func:`load_checkpoint`, not a damaged file."""
    save_npz(tmp_path / "x.npz", {"x": np.zeros(1)})

    def removed_meanwhile(path, **kwargs):
        raise FileNotFoundError(path)

    monkeypatch.setattr(np, "load", removed_meanwhile)
    assert delta_checkpoint.load_npz(tmp_path / "x.npz") is None
