"""Development and test helpers (the fake OpenAI upstream); not used by the serving path.
Imports only the standard library (and orjson when present); nothing in the service imports it.
"""
