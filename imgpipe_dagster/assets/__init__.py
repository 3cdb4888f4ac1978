"""Dagster assets (thin): url_corpus → image_analysis → progress_report, with their checks."""
