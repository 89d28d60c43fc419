"""What the engine knows about a model: the task interface (a spec rebuilt into model, data
and loss), parameter groups and the explained quantities."""
