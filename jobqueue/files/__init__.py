"""Files on disk: streaming validation and sharding of input JSONL (`inputs`), and scanning and
reading back result files (`results`). No database: the store imports these, never the reverse."""
