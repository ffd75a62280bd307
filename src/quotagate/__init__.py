"""quotagate: an LLM API gateway that enforces rate limits and spend quotas."""

__version__ = "0.1.0"
