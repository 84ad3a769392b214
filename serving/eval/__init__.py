"""`inferos eval`: quality of staged-KV profiles measured with the engine's own model."""
