"""Pieces shared by every kernel: dispatch, validation, padding, testing helpers."""
