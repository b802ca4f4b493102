"""Code shared by every task folder: distributed set-up, checkpoint IO, logging.

Imports `models/` at most; task folders (pretrain/, linear_eval/, ...) import this, never each other.
"""
