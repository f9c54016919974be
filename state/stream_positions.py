"""Where the model stands in the training topic: the next offset to learn, per partition.

Kafka delivers a message again whenever its offset was not committed before a crash or a
rebalance (Faust drops the acknowledgements it has not committed when a partition is revoked),
and the item learner, unlike the histories (which recognise an event id they hold), would learn
a training message twice. So the positions are saved in the model's checkpoint file, in the
same atomic write as the rows they produced (what Kafka Streams and Flink do with their source
offsets): a message below its partition's position is one the model already holds, and is
skipped. The worker commits a training message only once a checkpoint holds it (with item
sharing, a publish of its rows: ``stream_app/app.py``), so that a crash loses nothing
either: between the two, each message is learned once.

Positions belong to one topic: a checkpoint made on another training topic name starts with
none. A training topic deleted and made again restarts its offsets at 0, below every saved
position: its messages are then skipped (and counted) until they pass them; keep the topic,
or void the positions (:func:`mark_topics_renewed`) when that happens. A worker does it itself at
its start, where it finds a topic made again: an embedded broker's start, or a topic whose id
(Kafka 2.8 and later name each topic by an id made at its creation) is not the one it noted at
its last start (:func:`note_topic_ids`).

:class:`EventPositions` does the same one step earlier, for the events behind the training
examples: an example made again for an event read again after a crash is learned only if the
model does not hold it (the same caveats hold for the events topic).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from .gramian import atomic_write

PREFIX = "stream_"
EVENTS_PREFIX = "events_"


class _Positions:
    """Next offset to learn per stream (a key) of one topic, saved in the checkpoint under
    ``prefix``; each subclass says what a stream is and how its keys are stored."""

    prefix = ""
    keys_name = ""  # the array of the streams' keys in a checkpoint
    key_shape: tuple[int, ...] = ()  # of one key in that array

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._next: dict = {}

    def _admit(self, stream, offset: int) -> bool:
        """Whether the message at ``offset`` of ``stream`` is new; if so, the position moves
        past it."""
        new = offset >= self._next.get(stream, 0)
        if new:
            self._next[stream] = offset + 1
        return new

    def next_offsets(self) -> dict:
        return dict(self._next)

    def restore(self, next_offsets: Mapping) -> None:
        """Put the positions back to ``next_offsets`` (of :meth:`next_offsets`): the messages
        admitted since were not taken after all."""
        self._next = dict(next_offsets)

    def to_arrays(self) -> dict[str, np.ndarray]:
        streams = sorted(self._next)
        return {f"{self.prefix}topic": np.array(self.topic),
                f"{self.prefix}{self.keys_name}":
                    np.array(streams, dtype=np.int64).reshape(-1, *self.key_shape),
                f"{self.prefix}next": np.array([self._next[s] for s in streams],
                                               dtype=np.int64)}

    def set_arrays(self, data: dict[str, np.ndarray]) -> None:
        """The positions saved in ``data``; none where it has none (a checkpoint from before
        they were saved) or where they were taken on another topic."""
        self._next = {}
        prefix = self.prefix
        if f"{prefix}topic" not in data or str(data[f"{prefix}topic"]) != self.topic:
            return
        keys = data[f"{prefix}{self.keys_name}"].tolist()  # ints, or lists of ints
        self._next = {tuple(k) if isinstance(k, list) else k: int(n)
                      for k, n in zip(keys, data[f"{prefix}next"].tolist())}


class StreamPositions(_Positions):
    """Next offset to learn per partition of ``topic``; each message is let in once."""

    prefix = PREFIX
    keys_name = "partitions"

    def admit(self, partitions: Sequence[int], offsets: Sequence[int]) -> list[bool]:
        """For each message (in the order taken), whether it is new: its offset is at or past
        its partition's position, which then moves past it."""
        return [self._admit(int(partition), int(offset))
                for partition, offset in zip(partitions, offsets)]


class EventPositions(_Positions):
    """Next event offset to learn, per training partition and partition of the events
    ``topic``: each training example carries where its event is in the events topic, and the
    learner takes it once.

    Why: the ingest stores a user's history before the batch's training messages reach the
    broker. A worker that dies between the two reads the events again at its restart and finds
    them in the history (by their ``event_id``): their examples must be made again, from the
    history, or they are never learned; but those whose messages did reach the broker are
    learned already. Made again for every event read again, the examples are told apart here.

    Why per training partition: one worker ingests an events partition at a time, in order, and
    its producer delivers the messages of one training partition in the order sent, so in each
    (training partition, events partition) stream the offsets rise, and an example at an offset
    below its stream's position is one learned already (also after a rebalance: the next owner
    of an events partition sends again from the committed offset what the last owner may have
    sent). Across training partitions the offsets interleave in any order. An example without
    a place (a resend of a failed message, whose later ones may have been delivered first; an
    older message) is always learned.
    """

    prefix = EVENTS_PREFIX
    keys_name = "streams"
    key_shape = (2,)

    def admit(self, partitions: Sequence[int | None],
              sources: Sequence[tuple[int, int] | None]) -> list[bool]:
        """For each example (in the order taken): whether it is new. ``partitions``: the
        training partition of each example's message; ``sources``: the (partition, offset) of
        its event; an example lacking either is new."""
        return [partition is None or source is None
                or self._admit((partition, source[0]), source[1])
                for partition, source in zip(partitions, sources)]


#: beside the model checkpoint: its topics started anew at this file's time (an embedded
#: broker, which keeps nothing, started again), so positions saved before it are void; the
#: same name and ``.<topic>`` marks one topic made anew (``note_topic_ids``)
RENEWED = "topics-renewed"


#: beside the model checkpoint: the item-rows topic holds every row of this worker's items
#: (``stream_app.item_sharing``); gone when that topic, or every topic, starts anew
ROWS_SHARED = "rows-shared"


def mark_topics_renewed(checkpoint_dir: Path, topics: Iterable[str] | None = None, *,
                        rows_topic: str | None = None) -> None:
    """Make the positions of the checkpoints written so far void (not the model): for topics
    made anew, whose offsets start again below them (their messages would be skipped until
    they pass them). A mark, not a rewrite of the model file, which can be gigabytes.
    ``topics``: the topics made anew, each marked alone (the places in the others hold);
    all of them where None (an embedded broker's start). When they include the item-rows
    topic (``rows_topic``), it no longer holds the rows this worker published."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if topics is None:
        (checkpoint_dir / RENEWED).touch()
    else:
        topics = list(topics)
        for topic in topics:
            (checkpoint_dir / f"{RENEWED}.{topic}").touch()
    if topics is None or rows_topic in topics:
        (checkpoint_dir / ROWS_SHARED).unlink(missing_ok=True)


def positions_void(model_path: Path, topic: str | None = None) -> bool:
    """Whether the positions in ``topic`` saved in the checkpoint at ``model_path`` predate
    its last renewal (:func:`renewed_at`): a checkpoint written since holds new ones."""
    return written_before_renewal(model_path, renewed_at(model_path.parent, topic))


def renewed_at(checkpoint_dir: Path, topic: str | None = None) -> float | None:
    """When ``topic`` was last made anew (:func:`mark_topics_renewed`; its mark's time, or
    the mark of all topics' where newer), None if never; for no ``topic``, when any was."""
    marks = ([checkpoint_dir / RENEWED, checkpoint_dir / f"{RENEWED}.{topic}"]
             if topic is not None else
             [checkpoint_dir / RENEWED, *checkpoint_dir.glob(f"{RENEWED}.*")])
    times = []
    for mark in marks:
        try:
            times.append(mark.stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times, default=None)


def written_before_renewal(path: Path, renewal: float | None) -> bool:
    """Whether the file at ``path`` was last written before the topics' ``renewal`` (its
    places are in topics since made anew); False for a file that does not exist."""
    try:
        return renewal is not None and renewal >= path.stat().st_mtime
    except FileNotFoundError:
        return False


#: beside the model checkpoint: the id the broker gave each topic at the worker's last start
#: (JSON, topic → id)
TOPIC_IDS = "topic-ids.json"


def note_topic_ids(checkpoint_dir: Path, ids: Mapping[str, str],
                   created: Iterable[str] = (), *, rows_topic: str | None = None) -> list[str]:
    """Note the ids the broker gives the topics now (``ids``: topic → id) and return the
    topics made again since the last note: those whose id changed, and those of ``created``
    (made by this start, as they were missing) noted before. The checkpoint's positions in
    those topics are void (:func:`mark_topics_renewed`, each alone): a topic deleted and made
    again restarts its offsets at 0, and its messages would be skipped as held until they
    passed the old positions. A topic never noted (a first start, a start from before the
    notes were kept) is taken as it is; so is one the broker gives no id (before Kafka 2.8).
    Why ids and not offsets: a topic made again may hold more messages than the old one did by
    the time the worker starts, so no offset tells the two apart. ``rows_topic``: the
    item-rows topic, which, made anew, no longer holds the rows this worker published; the
    marks are made before the ids are noted, so a death between the two loses neither."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_dir / TOPIC_IDS
    noted = _read_topic_ids(path)
    renewed = sorted({topic for topic, topic_id in ids.items()
                      if noted.get(topic, topic_id) != topic_id}
                     | {topic for topic in created if topic in noted})
    if renewed:
        mark_topics_renewed(checkpoint_dir, renewed, rows_topic=rows_topic)
    current = {**noted, **ids}
    for topic in created:
        if topic not in ids:  # made now, its id not known yet: noted at the next start
            current.pop(topic, None)
    text = json.dumps(current, sort_keys=True).encode()
    atomic_write(path, lambda handle: handle.write(text))
    return renewed


def noted_topic_id(checkpoint_dir: Path, topic: str) -> str | None:
    """The id of ``topic`` noted at the worker's last start (:func:`note_topic_ids`), None
    where none was."""
    return _read_topic_ids(checkpoint_dir / TOPIC_IDS).get(topic)


def _read_topic_ids(path: Path) -> dict[str, str]:
    """The ids noted at ``path``; none where there is no note, or one that is not a JSON
    object of strings (a note this module did not write is not trusted)."""
    try:
        noted = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(noted, dict):
        return {}
    return {topic: topic_id for topic, topic_id in noted.items() if isinstance(topic_id, str)}
