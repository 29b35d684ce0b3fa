"""A durable chat backend for AutoGen agent teams."""
