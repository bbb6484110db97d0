"""The embedded demo: a backend admin API and an OpenAI-compatible upstream, both on 127.0.0.1.

`make run` starts them beside the syncer and the workers when no real SERVER_API_URL is set, so a
newcomer can stream a completion through the proxy on a fresh machine. Standard library only.
"""
