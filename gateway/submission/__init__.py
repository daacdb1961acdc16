"""The agents' authenticated submission port (DESIGN 3a): TLS, AUTH, lock-out, then AgentPath."""
