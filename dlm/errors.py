"""User-facing errors: the CLI prints their message as one line, without a traceback."""


class UserError(ValueError):
  """Bad input (config, prompt, workdir, data); the message names the fix."""
