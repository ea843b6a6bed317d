"""Training data: conversations and self-written prompts in, distilled shards of the base's own answers out."""
