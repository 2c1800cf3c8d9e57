"""Datasets (POP909, PIAST, JSONL manifests), grain pipelines and the feature cache (DESIGN
"Data")."""
