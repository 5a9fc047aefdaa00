"""Schedules: when rounds are generated, trained and weights move (``rounds.py``)."""
