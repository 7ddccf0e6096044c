"""The one base of every error a user can fix (a bad config value, missing or damaged data,
a checkpoint that does not fit, a directory that cannot be written).

main.py catches `UserError` alone and prints its message as one line (exit status 2), so
each message says what is wrong and what to do. This module imports nothing of the project:
every package may derive its errors from it.
"""


class UserError(Exception):
  """An error the user can fix; its message is shown as is, without a traceback."""


class WriteError(UserError):
  """A file could not be written (a read-only or full disk); what was there is intact."""
