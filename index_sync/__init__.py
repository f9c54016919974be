"""Build, version, load and hot-swap retrieval indices (HNSW) off the serving path."""
