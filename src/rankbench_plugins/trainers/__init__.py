"""Rank-adaptive training methods (the ``training`` problem kind): one plugin per module."""
