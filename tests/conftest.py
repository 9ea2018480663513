"""Suite-wide settings, applied before any test module imports moeplan."""

import os

# moeplan.record: the values moeplan computes (plans, speeds, tables) are built without validation in
# normal runs, for start-up time; in the tests every one is validated, so a wrong type fails here.
# Subprocesses the tests start inherit it. tests/test_records.py checks the unvalidated path.
os.environ.setdefault("MOEPLAN_VALIDATE_RECORDS", "1")
