"""The dpicl service: OpenAI-compatible proxy, admin API, stores, jobs and CLI."""
