"""The read-only web window (`web:` in the config, the [web] extra): a live status page at `/`,
JSON under `/api/v1/`, Prometheus text at `/metrics`, served by aiohttp in the daemon's loop.

Nothing here is imported unless `web:` is configured (`app.py` imports `server` then), so a
daemon without it loads neither aiohttp nor prometheus_client. `view` reads the daemon's
state, `metrics` renders it for Prometheus, `auth` checks logins, `server` routes and bounds.
"""
