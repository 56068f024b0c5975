"""Recording games as action-video datasets, and reading them back.

    writer.py       EpisodeWriter: chunked, atomic episode files (format: FORMAT.md)
    reader.py       Dataset / Episode: list and load episodes, report damaged chunks
    collect.py      recording sessions;  workers.py: in several processes, stopped by signals
    controllers.py  random and replay controllers (human.py, explorer.py, tracker.py: the others)
    stats.py        dataset summaries;  viewer.py: step through episodes
    __main__.py     python -m record {games, collect, stats, view}

Importing ``record`` imports nothing else.
"""
