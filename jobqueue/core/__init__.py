"""The core: the state machine, plain records, ids, durations and times. No I/O here."""
