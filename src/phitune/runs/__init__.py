"""The output folders phitune writes: a run folder written by training and reopened by eval/chat/merge/export
(folder.py), which folders a command may write into and the run's lock (ownership.py), file-system failures
turned into clear errors (storage.py), every file and folder written whole or not at all (atomic.py), and
``phitune merge`` (merge.py).

Nothing is imported here, so data/ and adapt/ import ``phitune.runs.atomic`` without loading (or cycling through)
the run-folder code.
"""
