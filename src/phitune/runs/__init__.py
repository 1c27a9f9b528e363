"""The output folders phitune writes: a run folder written by training and reopened by eval/chat/merge/export
(folder.py), which folders a command may write into and the run's lock (ownership.py), file-system failures
turned into clear errors (storage.py), and ``phitune merge`` (merge.py).
"""
