"""Data: interleaved JSONL documents, the shapes / digits generators, tokenization into shards, bundled samples."""
