"""What happens to a task request: task registry (tasks), demonstration cache and hot path (demos),
charged generation (warmup), next-token sources (generators), prompt injection (injection).
May import aggregation, proxy.store, proxy.upstreams and top-level proxy modules; never api, jobs, cli or app.
"""
