"""PROMPT ("Insight Any Instance"): the local and global-to-local prompt modules that give each box its tokens."""
