"""The dpicl service: app (wiring), api/, serving/, upstreams/, jobs/, store/, cli/ and the shared
modules auth, budget, config, errors, heartbeat, logs, metrics. Imports point one way (proxy -> aggregation,
api -> serving -> store); tests/test_layout.py checks the rule each package's docstring states.
"""
