"""The store contract suite: every public operation of `jobqueue.store`, one module per area,
run unchanged against SQLite and PostgreSQL through the `store` / `db_url` fixtures.

Each module calls the operations it covers from one small helper apiece (the section at its
top), so renaming or moving an operation is a one-line change there.
"""
