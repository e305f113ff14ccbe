"""Corpus extraction: `python -m data.extract` pulls Reddit comments from BigQuery (see extract.py)."""
