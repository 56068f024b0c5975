"""Recording games as action-video datasets (the format is episodes/FORMAT.md).

    collect.py      recording sessions;  workers.py: in several processes, stopped by signals
    controllers.py  keyboard, random and replay controllers, play's --policy choice
                    (human.py, explorer.py, tracker.py: the others)
    session.py      play.py's session recording: a dream written as dataset episodes
    stats.py        dataset summaries;  viewer.py: step through episodes
    __main__.py     python -m record {games, collect, stats, view}

Importing ``record`` imports nothing else.
"""
