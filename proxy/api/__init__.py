"""The HTTP API: one router per resource (openai: /v1, admin: /admin, jobs: /admin/jobs, health), shared
request helpers (common), error handlers (errors), request schemas and the middleware. May import aggregation,
serving, jobs, upstreams, store and the shared proxy modules; routers share only common's helpers.
"""
