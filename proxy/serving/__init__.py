"""What happens to a task request (moved here from proxy/demos.py; split follows)."""
