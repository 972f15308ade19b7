"""Files on disk: streaming validation and sharding of input JSONL."""
