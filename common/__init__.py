"""Code shared by the proxy workers and the syncer.

Standard library plus python-json-logger only: the syncer imports this package and must never
pull in Flask or gevent.
"""
