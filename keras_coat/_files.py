"""File-system checks shared by the command lines (conversion, training)."""

import os


def check_can_create_folder(folder, what):
    """Raises OSError unless `folder` exists or can be created, and is writable.

    Called before any long work, so that a bad output path fails at once and nothing is
    created for it. `what` names the path in the message (e.g. "--output-dir 'runs/a'").
    """
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OSError(f"cannot write {what}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"cannot write {what}: the folder {existing!r} is not writable")
