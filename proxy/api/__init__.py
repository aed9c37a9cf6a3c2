"""The HTTP API: one router per resource (openai: /v1, admin: /admin, jobs: /admin/jobs, health), the
shared request helpers (common), error handlers (errors), request schemas and the middleware. May import
serving, jobs, upstreams, store and the top-level proxy modules; routers share only common's helpers.
"""
