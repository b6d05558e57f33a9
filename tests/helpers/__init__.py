"""Test helpers: tiny models, tolerances, gradient masks, and the scripts tests run in subprocesses."""
