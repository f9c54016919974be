"""Pure math of streamrec: scoring, learners, encoders, evaluation metrics (no I/O, no Kafka)."""
