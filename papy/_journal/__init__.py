"""The journal: a SQLite file that makes a run resumable and caches node outputs.

**What is recorded.** Per node that is a *terminal* (a sink, or the node ``map`` yields) or
was added with ``cache=True``, and per input item: the output the node produced (or its
Failure), keyed by ``(node, item, sub-item)`` and stamped with the node's *fingerprint*.
An input item is finished when every terminal has its output: for a terminal below a
scatter, when all its sub-items are there, which the driver marks with a ``complete`` row.

**Item identity.** Without ``key=`` an input item is known by a digest of its value (a
canonical encoding: containers element by element, dicts and sets in a fixed order, other
objects by their pickle) plus its occurrence count among equal items of the run, so
inserting, removing, reordering or editing input items never hands one item another's
output. With ``key=`` it is known by the key, which must then be unique: a repeated key
raises :class:`JournalError` at admission, before anything is looked up for it.

**Code identity.** A node's fingerprint covers its functions' code (bytecode, constants,
names of the globals they read), defaults, closure values, ``args``, ``kwargs``, its role
(scatter, gather, batched, join), its parents and their fingerprints. So a changed node and
everything downstream of it no longer match their records: the records of a changed node
are dropped when the journal is opened, and the log and the report say which nodes
changed and why.

**Who records.** The process that ran the task, right after running it (one transaction
per task; per item for a sink, so a sink's side effect and its record are never more than
one item apart). A worker running a journaled task when the driver dies finishes the task
and its commit before it exits (see ``papy.pools._worker``). Before running a task, the
worker looks the items up: a node with a record is not run again, its output is reused.

**Trust.** The file must belong to the user running PaPy, and every record carries an
HMAC keyed by a per-user secret (``$XDG_CONFIG_HOME/papy/secret``, mode 0600), checked
before its pickle is loaded: a journal written by someone else, or edited, is refused.

**One run at a time.** ``run.db.lock`` (next to the journal) holds a lock for the
run's whole life and names its owner; a second run fails at once with the owner's pid and
host. On close, the write-ahead log is checkpointed into the main file, so ``run.db`` alone
is the whole journal.

**Modules.** This file imports nothing, so importing one module loads only what it
needs. Worker side, imported by :mod:`papy._task` (below the pools; it imports only
``papy._errors`` and ``papy._items``): ``files`` (format, modes, owners, errors),
``secret`` (the user's key, record HMACs), ``store`` (one run's connections and locks,
``task_guard``), ``sinklog`` (a sink batch in progress, folding a crashed one),
``records`` (``lookup``/``record``). Driver side: ``digest`` (item and code identity),
``ownership`` (the run's lock), ``checkpoint`` (folding the write-ahead log in while a run
goes), ``journal`` (:class:`Journal`), ``admin`` (``papy journal show/failures/forget``).
"""
