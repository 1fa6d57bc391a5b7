"""Scoring of a resident model: helpfulness, harm and over-refusal per language."""
