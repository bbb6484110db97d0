"""Token-table syncer: fetches the token-model list from the backend and replaces the table file."""
