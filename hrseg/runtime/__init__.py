"""What configures the process, in one place (filled in by the runtime commit)."""
