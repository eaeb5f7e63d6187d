"""The post's experiments as library functions that notebooks call; each writes its tables to a run folder."""
