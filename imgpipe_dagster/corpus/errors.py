"""Errors a user can fix by changing the input they gave the ingest."""

from __future__ import annotations


class CorpusInputError(ValueError):
    """An input file cannot be ingested (missing, empty, wrong columns, unreadable). The message is one
    line naming the file and what to do; nothing from that file has been written."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
