"""The action-video dataset format (FORMAT.md): episode writing, reading, frame codecs, and the
resize to model resolution that writer, reader and games share.

Every other package reads or writes data through this one; it imports nothing else of the project.
"""
