"""The kbatch server: an HTTP/JSON API in front of a backend.

Imported only by ``kbatch server``; never by the CLI's other commands.
"""
