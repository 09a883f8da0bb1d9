"""Import and export public checkpoints (LLaDA, Dream) as dlm parameters."""
